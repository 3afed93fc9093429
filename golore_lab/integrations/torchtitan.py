"""torchtitan trains with SubspaceAdamW / SubspaceSGD (GaLore, GoLore@x%, GoLore@auto): a thin OptimizersContainer.

Written against ``torchtitan==0.3.0`` (the ``torchtitan`` extra pins it); torchtitan is moving its optimizer
configuration, so this module only adds what it must:

* :class:`SubspaceOptimizersContainer` -- torchtitan's ``OptimizersContainer`` that also knows the optimizer names
  ``"SubspaceAdamW"`` and ``"SubspaceSGD"``. Parameters go to groups by regex on their fully qualified names, as
  torchtitan does (first match wins); a group with ``rank`` in its ``optimizer_kwargs`` is trained in a subspace,
  one without is plain AdamW / SGD. torchtitan's ``implementation`` switch (fused / foreach) is not passed to these
  optimizers (they choose their own kernels; their ``foreach`` key is their batched path).
* :func:`golore_optimizer_config` -- the container's config for a method name (``galore``, ``golore@20``,
  ``golore@auto``, ``full``) and the usual hyper-parameters, with the subspace group on the attention and
  feed-forward matrices of torchtitan's Llama (:data:`LLAMA_MATRICES`).

FSDP2 sharding and torchtitan's DCP checkpointer need nothing more: the optimizers take ``DTensor`` parameters
(:mod:`golore_lab.distributed`), torchtitan builds FQN-keyed flat state dicts from the ``param_names`` it puts in
each group, and the state holds only tensors and Python numbers (``torch.load(..., weights_only=True)`` reads it).

**The zero-gradient step.** torchtitan materialises empty optimizer state before saving or loading by running one
step with zero gradients and lr 0 (``init_optim_state``). For a subspace optimizer that step is not harmless: it
would count as step 0, choose a basis from the zero gradient (the SVD of 0), and the first real step, now step 1,
would not refresh -- the first ``update_proj_gap - 1`` real steps would run in that meaningless basis. The
container therefore remembers that the state came from such a step (also across a checkpoint, in the entry
:data:`FRESH_KEY`) and drops it before the first real ``step()``, which then is exactly a fresh optimizer's first
step: a basis from the first real gradient, the same random draws (they are a function of seed, parameter position
and step). ``tests/test_torchtitan.py`` checks this bit for bit.

Example (a torchtitan ``Trainer.Config``)::

    from golore_lab.integrations.torchtitan import golore_optimizer_config
    config.optimizer = golore_optimizer_config("golore@20", total_steps=config.training.steps, lr=1e-3,
                                               rank=128, update_proj_gap=200)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from golore_lab import SubspaceAdamW, SubspaceSGD
from golore_lab.integrations import method_group_keys

#: torchtitan's Llama (llama3): ``layers.{i}.attention.{wq,wk,wv,wo}`` (or a fused ``wqkv``) and
#: ``layers.{i}.feed_forward.{w1,w2,w3}`` weights; not the norms (``attention_norm``), embeddings or output.
LLAMA_MATRICES = r"(^|\.)layers\.\d+\.(attention|feed_forward)\.\w+\.weight$"

#: Entry of the container's state dict: per optimizer, 1 while its state is the zero-gradient step's.
FRESH_KEY = "golore_lab.fresh"

FACTORIES: dict[str, Callable[..., Optimizer]] = {"SubspaceAdamW": SubspaceAdamW, "SubspaceSGD": SubspaceSGD}


class SubspaceOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` with ``SubspaceAdamW`` / ``SubspaceSGD`` and a safe ``init_optim_state``."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name in FACTORIES:
            return FACTORIES[name]
        return OptimizersContainer._resolve_optimizer_factory(name)

    @staticmethod
    def _build_impl_kwargs(config) -> dict[str, Any]:
        return {}

    def _fresh(self) -> list[bool]:
        return [bool(getattr(optim, "_golore_fresh", False)) for optim in self.optimizers]

    def state_dict(self) -> dict[str, Any]:
        for optim in self.optimizers:
            if not optim.state:  # torchtitan's init_optim_state (in super) is about to run a zero-gradient step
                optim._golore_fresh = True
        result = super().state_dict()
        result[FRESH_KEY] = torch.tensor(self._fresh(), dtype=torch.int64)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        flags = state_dict.get(FRESH_KEY)
        flags = [False] * len(self.optimizers) if flags is None else [bool(x) for x in flags.tolist()]
        if len(flags) != len(self.optimizers):
            raise ValueError(f"Checkpoint entry {FRESH_KEY!r} has {len(flags)} optimizers, this container "
                             f"{len(self.optimizers)}")
        for optim, flag in zip(self.optimizers, flags):
            optim._golore_fresh = flag

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for optim in self.optimizers:
            if getattr(optim, "_golore_fresh", False):
                optim.state.clear()  # the zero-gradient step's state: this is the first real step
                optim._golore_fresh = False
        return super().step(closure)


def golore_optimizer_config(method: str = "golore@20", *, total_steps: int | None = None, lr: float = 1e-3,
                            rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0,
                            optimizer: str = "SubspaceAdamW", betas: tuple[float, float] = (0.9, 0.999),
                            eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
                            subspace_pattern: str = LLAMA_MATRICES, seed: int = 0,
                            **subspace: Any) -> SubspaceOptimizersContainer.Config:
    """The container's config: ``subspace_pattern`` matrices in a rank-``rank`` subspace by ``method``, every other
    parameter in a full-space group of the same optimizer (``method="full"``: that group only).

    ``total_steps`` is needed by ``golore@X`` (the switch step is round((1 - X/100) T)). ``subspace`` holds further
    rank-group keys (``proj_type``, ``state_on_refresh``, ``foreach`` ...).
    """
    if optimizer not in FACTORIES:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (choose from {', '.join(FACTORIES)})")
    rule = ({"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
            if optimizer == "SubspaceAdamW" else {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
    keys = method_group_keys(method, total_steps)
    groups = []
    if keys is not None:
        groups.append(ParamGroupConfig(pattern=subspace_pattern, optimizer_name=optimizer, optimizer_kwargs={
            **rule, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "seed": seed, **keys,
            **subspace}))
    groups.append(ParamGroupConfig(pattern=r".*", optimizer_name=optimizer, optimizer_kwargs=dict(rule)))
    return SubspaceOptimizersContainer.Config(param_groups=groups)
