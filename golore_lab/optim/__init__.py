"""GaLore, GoLore, GoLore@x% and large-batch GaLore as ``torch.optim`` optimizers.

One bookkeeping class, :class:`SubspaceOptimizer`, does what the three algorithms share; they differ only in
the projector (:mod:`golore_lab.projection`) and in the gradient fed to it at a refresh. For a parameter W
(m × n) in a group with a ``rank`` r, projected on the left (the right case is the transpose), step t is::

    G  = ∇W                                        # (m, n), stochastic
    if t % update_proj_gap == 0:                   # refresh
        P_new = projector(G, r)                    # (m, r): SVD (GaLore) or Haar-random (GoLore)
        state ← carry(state, P_newᵀ P_old)          # state_on_refresh: "project" | "keep" | "reset"
    R  = Pᵀ G                                      # (r, n)
    N  = rule(R, state)                            # AdamW or momentum SGD on the r × n state
    W ← W − lr · scale · P N                       # scale (α) applied once

GoLore@x% is ``switch_step=K``: refreshes at steps t < K use ``projection`` (the SVD by default), refreshes
at t ≥ K use random projections; for x% random steps out of T, K = round((1 − x/100) · T), which
``switch_fraction=x/100, total_steps=T`` computes (:func:`golore_lab.spec.resolve_switch`). GoLore@auto is
``switch_step="auto"``: each parameter switches to random refreshes, for good, at the first refresh where its
SVD subspace is estimated to capture less of the true gradient than a random one; the test uses the projected
gradients of the period that just ended (:mod:`golore_lab.switching`, derivation in ``docs/when_to_switch.md``),
and :meth:`SubspaceOptimizer.switch_log` lists the switches. Large-batch GaLore
is GaLore fed a larger batch at the steps where :meth:`SubspaceOptimizer.refresh_due` is True
(:func:`microbatches`).

Groups without ``rank`` (biases, norms, embeddings) use the same rule in the full space, which is exactly
``torch.optim.AdamW`` / ``torch.optim.SGD``. AdamW's element-wise work, full-space and r-sized, runs in torch's
fused AdamW kernel (:func:`golore_lab.batched.fused_adamw_`, the one of ``torch.optim.AdamW(fused=True)``)
wherever it can take the tensors, else in element-wise kernels (:mod:`golore_lab.rules`); same rule, to rounding.

The package, as ``torch.optim`` lays out an optimizer (a small class, functional backends with one signature):

==================  ====================================================================================
:mod:`.base`        :class:`SubspaceOptimizer`: groups, validation, the step plan → refresh → project → rule → apply
:mod:`.records`     frozen records of a step: :class:`~.records.Target`, :class:`~.records.Basis`, :class:`Refresh`
:mod:`.bases`       the one basis builder (per-tensor and batched), a user's projector checked on both
:mod:`.functional`  the rule and the update: ``single`` / ``foreach`` / ``fused`` backends behind :func:`~.functional.update`
:mod:`.adamw`       :class:`SubspaceAdamW` and its rule; :mod:`.sgd`: :class:`SubspaceSGD` and its rule
:mod:`.auto`        GoLore@auto's part of the step and its checkpoint layout
:mod:`.checkpoint`  ``state_dict`` / ``load_state_dict`` through torch's state-dict hooks
:mod:`.finite`      the non-finite gradient checks
:mod:`.layerwise`   layer-wise (in-backward) steps: :func:`~.layerwise.layerwise`, accumulation in the subspace
==================  ====================================================================================

Sharded parameters go through :mod:`golore_lab.distributed`'s operation objects (:func:`~golore_lab.distributed.ops`).
"""
from __future__ import annotations

from .. import batched, distributed, rules, spec, switching  # noqa: F401 (importable from here, as before)
from .. import projection as proj  # noqa: F401
from ..spec import SUBSPACE_DEFAULTS
from .adamw import AdamWRule, SubspaceAdamW
from .auto import _Auto, _auto_fixed  # noqa: F401
from .base import TORCH_ONLY_KEYS, SubspaceOptimizer  # noqa: F401
from .checkpoint import OPTIONAL_KEYS  # noqa: F401
from .checkpoint import saved_callable as _saved_callable  # noqa: F401
from .checkpoint import subclasses as _subclasses  # noqa: F401
from .finite import nonfinite_flags
from .layerwise import Layerwise, layerwise
from .functional import local_state as _local_state  # noqa: F401
from .records import Basis, Refresh, Target  # noqa: F401
from .sgd import SGDRule, SubspaceSGD

__all__ = ["SubspaceOptimizer", "SubspaceAdamW", "SubspaceSGD", "Refresh", "microbatches", "AdamWRule", "SGDRule",
           "SUBSPACE_DEFAULTS", "nonfinite_flags", "layerwise", "Layerwise"]


def microbatches(optimizer: SubspaceOptimizer, base: int, refresh: int) -> int:
    """How many micro-batches to accumulate before the next ``step()``: ``refresh`` at refresh steps, else ``base``.

    Large-batch GaLore in a gradient-accumulation loop::

        for step in range(total_steps):
            k = microbatches(opt, base=1, refresh=8)   # 8x the batch when the SVD is taken
            for _ in range(k):
                (loss_fn(model, next(batches)) / k).backward()
            opt.step(); opt.zero_grad()
    """
    if not (spec.is_int(base) and spec.is_int(refresh) and base >= 1 and refresh >= 1):
        raise ValueError(f"Invalid micro-batch counts: base={base!r}, refresh={refresh!r} (must be integers >= 1)")
    return refresh if optimizer.refresh_due() else base
