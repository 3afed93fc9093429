"""The explorer's callback without a browser: its data follow the counterexample's laws as the inputs move, its
figure draws those data, the widgets re-run it, and the committed notebook shows a PNG where widgets cannot render.
(The explorer in a real browser: tests/test_explorer_browser.py.)"""
from __future__ import annotations

import base64
import time
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest

from golore_lab import counterexample as ce
from golore_lab import explorer
from golore_lab import theory as th

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def defaults():
    settings = explorer.Settings()
    return settings, explorer.compute(settings)


def test_galore_ends_at_the_laws_limit_for_each_noise_level(defaults):
    """SGD, ±1 noise: GaLore's end is the exact finite-step limit of the noise level set by the ν control, so it
    moves with ν exactly as the law says (and L.B. GaLore with B = 3 sits above its own, lower, limit)."""
    settings, summary = defaults
    for nu in (1.0, 0.5):
        s = explorer.Settings(noise_sigma=nu)
        final = explorer.final(summary if nu == settings.noise_sigma else explorer.compute(s))
        problem = ce.Counterexample(noise_sigma=nu)
        limit = th.lb_galore_limit(problem, 1, s.lr, s.update_proj_gap) - problem.f_star
        assert abs(final["galore"] - limit) < 1e-9, nu
        assert final["lb-galore"] >= th.lb_galore_limit(problem, 3, s.lr, s.update_proj_gap) - problem.f_star - 1e-9
        assert final["full"] < 1e-8 and final["galore"] > 10 * final["golore@100"]


def test_every_control_changes_the_data(defaults):
    _, summary = defaults
    base = explorer.final(summary)
    for change in (dict(noise_sigma=0.5), dict(rank=6), dict(batch=4), dict(update_proj_gap=20), dict(lr=1e-3),
                   dict(optimizer="adamw"), dict(noise="gaussian")):
        moved = explorer.final(explorer.compute(explorer.Settings(**change)))
        assert not np.allclose(moved.to_numpy(), base.to_numpy(), rtol=1e-6, atol=0), change
    # the ones the theory predicts: an even batch converges; Gaussian ξ lets GaLore move on; GaLore's κ ends at 0
    assert explorer.final(explorer.compute(explorer.Settings(batch=4)))["lb-galore"] < 0.1 * base["lb-galore"]
    gaussian = explorer.final(explorer.compute(explorer.Settings(noise="gaussian")))
    assert gaussian["galore"] < 0.1 * base["galore"]
    assert explorer.final(summary, "captured")["galore"] < 1e-12


def test_the_figure_draws_the_data(defaults):
    settings, summary = defaults
    fig = explorer.draw(summary, settings)
    gap_axis, kappa_axis, top_axis = fig.axes
    galore = summary[(summary.method == "galore")]
    line = next(l for l in kappa_axis.get_lines() if l.get_label() == "GaLore")
    np.testing.assert_allclose(line.get_ydata(), galore[galore.quantity == "captured"]["mean"])
    reference = next(l for l in kappa_axis.get_lines() if l.get_label().startswith("r/m"))
    assert reference.get_ydata()[0] == pytest.approx(0.4)
    stalls = [l.get_label() for l in gap_axis.get_lines() if "stall" in l.get_label()]
    assert len(stalls) == 2 and "ν/3" in stalls[1]
    assert "ν = 1" in fig._suptitle.get_text() and "SGD" in fig._suptitle.get_text()
    plt.close(fig)
    fig = explorer.figure(rank=6, noise="gaussian", batch=2)  # the callback: settings in, figure out
    gap_axis, kappa_axis, _ = fig.axes
    assert next(l for l in kappa_axis.get_lines() if l.get_label().startswith("r/m")).get_ydata()[0] == pytest.approx(0.6)
    assert not [l for l in gap_axis.get_lines() if "stall" in l.get_label()]  # no ±1-law stall for Gaussian ξ
    assert "Gaussian" in fig._suptitle.get_text()
    plt.close(fig)


def test_a_bad_setting_names_itself():
    with pytest.raises(ValueError, match="Invalid update_proj_gap: 30"):
        explorer.compute(explorer.Settings(update_proj_gap=30))
    with pytest.raises(ValueError, match="Invalid optimizer: 'lion'"):
        explorer.compute(explorer.Settings(optimizer="lion"))


def test_the_widgets_rerun_the_callback():
    live = explorer.Explorer()
    first, summary = live.png, live.summary
    assert first.startswith(PNG_MAGIC)
    live.controls["noise_sigma"].value = 0.5  # what a slider move does: the observer re-runs the explorer
    assert live.settings.noise_sigma == 0.5 and live.png != first
    assert explorer.final(live.summary)["galore"] < explorer.final(summary)["galore"]
    assert live.status.value.startswith("ran in")
    live.controls["optimizer"].value = "adamw"
    assert live.settings.optimizer == "adamw" and live.settings.noise_sigma == 0.5
    bundle = live._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == live.png


def test_callback_time_at_the_defaults():
    """About a second on a quiet machine; the bound here is generous (a shared 2-core CI)."""
    start = time.perf_counter()
    plt.close(explorer.figure())
    assert time.perf_counter() - start < 20


def test_committed_notebook_shows_the_explorer_as_a_png():
    """The web view of the committed notebook cannot render widgets: the explorer's output carries a PNG too."""
    notebook = nbformat.read(ROOT / "notebooks" / "01_counterexample.ipynb", as_version=4)
    cells = [c for c in notebook.cells if c.cell_type == "code" and "explorer.show(" in c.source]
    assert len(cells) == 1
    outputs = [o for o in cells[0].outputs if "image/png" in o.get("data", {})]
    assert len(outputs) == 1 and "application/vnd.jupyter.widget-view+json" in outputs[0]["data"]
    assert base64.b64decode(outputs[0]["data"]["image/png"]).startswith(PNG_MAGIC)
    assert any("docs/the_argument.md" in c.source for c in notebook.cells if c.cell_type == "markdown")
