"""The no-B instance of the non-convergence theorem: B = 0, so ‖∇f(X₀)‖₂ = ½ < σ and GaLore never moves.

Same runs and frame as :mod:`golore_lab.artefacts.fig1_counterexample` on ``Counterexample(linear_term=False)``
(f* = 0, GaLore stays at f(X₀) = 0.75 while the other methods reach 0).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from . import fig1_counterexample as fig1

NAME = "fig1_counterexample_noB"
Config = fig1.Config
PRESETS = {name: fig1.no_b(config) for name, config in fig1.PRESETS.items()}
GROUP_BY = fig1.GROUP_BY
expected_groups = fig1.expected_groups
run = fig1.run


def plot(frame: pd.DataFrame) -> plt.Figure:
    return fig1.draw(frame, ce.Counterexample(linear_term=False),
                     "No-B instance: GaLore never leaves X₀; the others reach f* = 0", ylim=(-0.1, 0.85))
