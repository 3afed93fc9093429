"""Glue between golore_lab's optimizers and other training stacks (Hugging Face models, torchtitan).

:func:`method_group_keys` turns a method name of :mod:`golore_lab.methods` into the subspace param-group keys of
:class:`golore_lab.SubspaceAdamW` / :class:`golore_lab.SubspaceSGD`, the one translation every adapter uses:

==============  ==========================================  =========================================
method          keys of the rank group                      meaning
==============  ==========================================  =========================================
``galore``      ``switch_step=None``                        SVD bases at every refresh
``golore@X``    ``switch_step=round((1 - X/100) T)``        GoLore@X% (``golore@100``: pure GoLore)
``golore@auto`` ``switch_step="auto"``                      each matrix switches when noise-dominated
==============  ==========================================  =========================================

``full`` has no rank group (returns ``None``); ``lb-galore`` needs the training loop to feed a larger batch at
refresh steps, which these adapters do not do, so it is refused.

:mod:`golore_lab.integrations.torchtitan` (needs ``torchtitan``) is imported on its own.
"""
from __future__ import annotations

from typing import Any

from golore_lab.methods import parse


def method_group_keys(method: str, total_steps: int | None = None) -> dict[str, Any] | None:
    """The rank group's ``switch_step`` for ``method`` over ``total_steps`` steps (None for ``full``)."""
    m = parse(method)
    if m.full:
        return None
    if m.large_batch:
        raise ValueError(f"Unsupported method here: {method!r} (large-batch GaLore needs a loop that takes a "
                         "larger batch at refresh steps; use galore, golore@X or golore@auto)")
    if m.random_fraction is not None and total_steps is None:
        raise ValueError(f"Method {method!r} needs total_steps (GoLore@X% switches at round((1 - X/100) T))")
    return {"switch_step": m.switch_step(total_steps) if total_steps is not None else m.switch_step(0)}
