"""One palette, one set of labels and markers for every figure of the package, and the PNG writer.

Methods are styled by family (Full, GaLore, L.B. GaLore, GoLore@X%, GoLore@auto); the label is
:attr:`golore_lab.methods.Method.label`. Each family has its own colour, marker and line style, so the
curves stay distinguishable in greyscale and for colour-blind readers.
"""
from __future__ import annotations

import io

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from .methods import parse

#: colour, marker and line style per method family (colour-blind-safe Okabe–Ito colours)
STYLE = {
    "full": ("#0072B2", "^", "-"),
    "galore": ("#D55E00", "s", "-"),
    "lb-galore": ("#009E73", "D", "--"),
    "golore": ("#CC79A7", "o", "-."),
    "golore@auto": ("#56B4E9", "v", ":"),
}
#: the neutral colour of reference data (closed forms, random instances)
GREY = "#777777"
#: the figures' resolution (pixels per inch)
DPI = 130
#: the matplotlib version that rendered the committed PNGs (``make setup`` installs it); another version may
#: move pixels. It is part of every figure's stamp (:mod:`golore_lab.artefacts.stamp`)
RENDERED_WITH = "3.11.2"


def family(method: str) -> str:
    """``full``, ``galore``, ``lb-galore``, ``golore`` (every ``golore@X``) or ``golore@auto``."""
    m = parse(method)
    if m.full:
        return "full"
    if m.large_batch:
        return "lb-galore"
    if m.auto:
        return "golore@auto"
    return "golore" if m.random_fraction is not None else "galore"


def method_label(method: str) -> str:
    """The name a figure shows: :attr:`golore_lab.methods.Method.label`."""
    return parse(method).label


def method_color(method: str) -> str:
    return STYLE[family(method)][0]


def method_style(method: str, **overrides) -> dict:
    """Keyword arguments for ``Axes.plot``: colour, marker, line style and label of ``method``."""
    color, marker, ls = STYLE[family(method)]
    return {"color": color, "marker": marker, "ls": ls, "label": method_label(method), **overrides}


def band_plot(ax, summary: pd.DataFrame, x: str = "step", y: str = "mean", low: str = "min", high: str = "max",
              x_scale: float = 1.0, markers: int = 8) -> None:
    """One line per method (``markers`` markers along it) with a shaded band, e.g. min–max over seeds."""
    for method, rows in summary.groupby("method", sort=False):
        xs = rows[x] / x_scale
        ax.plot(xs, rows[y], lw=1.6, ms=4, markevery=max(1, len(rows) // markers), **method_style(method))
        if low in rows and high in rows:
            ax.fill_between(xs, rows[low], rows[high], color=method_color(method), alpha=0.2, lw=0)


def legend_below(ax, ncol: int = 2, y: float = -0.2, **kwargs):
    """The axes' legend under its x-axis label (its top at ``y`` in axes coordinates), outside the data;
    ``fig.tight_layout`` makes room for it."""
    return ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, y), ncol=ncol, frameon=False, **kwargs)


def png_bytes(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes without volatile metadata (no software version), then closed.

    For the same data and matplotlib version Agg draws the same picture, but not always the same bytes on
    another CPU (anti-aliasing may differ by a colour level on a few pixels): ``python -m golore_lab figures``
    therefore leaves a PNG whose stamp matches alone (:mod:`golore_lab.artefacts.stamp`), and the tests compare
    pictures within a tolerance.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def no_minor_labels(axis) -> None:
    """Hide the minor tick labels of a log axis (they crowd a short range)."""
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
