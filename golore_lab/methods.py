"""Method names, one meaning in every API of the package.

A *method* says how the subspace is chosen over a run of ``total_steps`` steps. The same spelling means the
same algorithm in :func:`golore_lab.counterexample.run`, in the pre-training and fine-tuning programs, and in
the artefact configurations:

=================  ===================================================================================
``full``           full-rank training (no subspace)
``galore``         top-r SVD of the stochastic gradient at every refresh (GaLore)
``golore@X``       GaLore for the first (100 − X)% of the steps, Haar-random subspaces for the last X%
                   (GoLore@X% of the paper); ``golore@100`` is pure GoLore, ``golore@20`` the paper's LLM
                   recipe, ``golore@75`` / ``golore@50`` its counterexample runs
``golore@auto``    GaLore until each matrix's SVD subspace is judged noise-dominated, then random subspaces
                   for that matrix, decided online by the optimizer (``switch_step="auto"``, see
                   :mod:`golore_lab.switching`); needs no run length
``lb-galore``      large-batch GaLore: GaLore fed a larger batch at refresh steps
=================  ===================================================================================

The bare ``golore`` is refused: it once meant pure GoLore in one API and GoLore@20% in another.

>>> parse("golore@20").switch_step(1000)
800
>>> parse("golore@100").switch_step(1000)
0
>>> parse("golore@auto").switch_step(1000)
'auto'
"""
from __future__ import annotations

import math
from dataclasses import dataclass

NAMES = ("full", "galore", "golore@X", "golore@auto", "lb-galore")


@dataclass(frozen=True)
class Method:
    """A parsed method name.

    ``random_fraction`` is the share of the steps (0..1) that use random subspaces at the end of the run (None:
    never, or decided online); ``auto`` marks GoLore@auto (the optimizers' ``switch_step="auto"``);
    ``large_batch`` marks L.B. GaLore.
    """

    name: str
    full: bool = False
    random_fraction: float | None = None
    large_batch: bool = False
    auto: bool = False

    @property
    def subspace(self) -> bool:
        return not self.full

    def switch_step(self, total_steps: int) -> int | str | None:
        """The optimizers' ``switch_step``: round((1 − X/100) · T) for GoLore@X%, ``"auto"`` for GoLore@auto, None
        for no switch."""
        if self.auto:
            return "auto"
        if self.random_fraction is None:
            return None
        return round((1.0 - self.random_fraction) * total_steps)

    @property
    def label(self) -> str:
        """The name a figure or table shows (GoLore@20%, L.B. GaLore, ...)."""
        if self.full:
            return "Full"
        if self.large_batch:
            return "L.B. GaLore"
        if self.auto:
            return "GoLore@auto"
        if self.random_fraction is None:
            return "GaLore"
        if self.random_fraction == 1.0:
            return "GoLore"
        return f"GoLore@{100 * self.random_fraction:g}%"


def parse(name: str) -> Method:
    """Parse a method name (see the module docstring); a bad one is a ``ValueError`` naming it."""
    if not isinstance(name, str):
        raise ValueError(f"Invalid method: {name!r} (must be a string such as 'galore' or 'golore@20')")
    if name == "full":
        return Method(name, full=True)
    if name == "galore":
        return Method(name)
    if name == "lb-galore":
        return Method(name, large_batch=True)
    if name == "golore":
        raise ValueError("Invalid method: 'golore' is ambiguous; write 'golore@100' for pure GoLore or "
                         "'golore@X' for GoLore@X% (GaLore, then random subspaces for the last X% of the steps; "
                         "the LLM recipe is 'golore@20')")
    if name == "golore@auto":
        return Method(name, auto=True)
    if name.startswith("golore@"):
        text = name.partition("@")[2]
        try:
            percent = float(text)
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100 or text.strip() != text:
            raise ValueError(f"Invalid method: {name!r} (golore@X needs a number 0 < X <= 100, e.g. 'golore@20', "
                             "or 'auto')")
        return Method(name, random_fraction=percent / 100)
    raise ValueError(f"Invalid method: {name!r} (must be one of {', '.join(map(repr, NAMES))})")
