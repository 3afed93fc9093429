"""The three ways the loop trains a task's model, behind one small interface (:class:`TrainPath`).

* :class:`OptimizerPath` (``path="optimizer"``): the task's model, trained by ``SubspaceAdamW`` /
  ``SubspaceSGD`` (or the plain torch optimizer for ``full``); under DDP the loss goes through
  ``DistributedDataParallel``;
* :class:`WrapperPath` (``path="wrapper"``): the same matrices wrapped by :class:`golore_lab.wrapper.SubspaceModel`,
  whose low-rank factors and the full parameters plain ``torch.optim.AdamW`` / ``SGD`` train; the wrapper's
  refresh protocol runs around the forward (GoLore's random bases before it, SVD ones after backward), clipping
  is of the factors' gradients P^T G, and checkpoints hold the merged weights under ``"model"`` (a plain state
  dict of the task's architecture) and the wrapper's own state under ``"wrapper"``;
* :class:`LayerwisePath` (``layerwise``): the optimizer path with each parameter's step taken in the backward
  (:mod:`golore_lab.optim.layerwise`): the gradients are freed as they are used, GoLore's are accumulated in the
  subspace across micro-batches; full training takes ``SubspaceAdamW`` / ``SubspaceSGD`` without a rank (torch's
  AdamW / SGD rule); no global clipping (refused by the configuration); under DDP the layer-wise optimizer
  reduces the gradients itself, through DDP's communication hook (GoLore's projected, r/m of the bytes);
  with ``fsdp`` (:class:`FSDPLayerwisePath`), the steps run in FSDP2's hooks on the reduce-scattered shards;
* :class:`FSDPPath` (``fsdp``): the model sharded with FSDP2 (:func:`golore_lab.distributed.shard_model`) before
  the optimizer's groups are built; every rank evaluates (the forward all-gathers), checkpoints are
  ``torch.distributed.checkpoint`` folders, and the final model is the plain one with the full weights.

The loop (:class:`golore_lab.lm.trainer.Trainer`) only calls the interface: :attr:`~TrainPath.net` for the loss,
:meth:`~TrainPath.before_forward` / :meth:`~TrainPath.after_backward`, :meth:`~TrainPath.clip`,
:meth:`~TrainPath.save` / :meth:`~TrainPath.load`, :meth:`~TrainPath.switch_log`, :meth:`~TrainPath.final_model`.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import memory
from .config import TrainConfig
from .runfolder import load_sharded_checkpoint, save_checkpoint, save_sharded_checkpoint


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer for ``cfg.method`` x ``cfg.optimizer`` over ``groups`` (subspace keys only in group 0).

    ``full`` is plain ``torch.optim.AdamW`` / ``torch.optim.SGD``; the others are the package's
    ``SubspaceAdamW`` / ``SubspaceSGD`` with SVD projections (``galore``, ``lb-galore``) or SVD until
    :attr:`TrainConfig.switch_step` and random after (``golore@X``). With ``cfg.path == "wrapper"`` the groups are
    :func:`wrap_model`'s (factors, full parameters) and the optimizer is the plain torch one, as for ``full``.
    """
    if cfg.spec.full or cfg.path == "wrapper":
        plain = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in groups]
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(plain, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(plain, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    from golore_lab import SubspaceAdamW, SubspaceSGD

    subspace = dict(projection="svd", switch_step=cfg.switch_step, state_on_refresh=cfg.state_on_refresh, seed=cfg.seed)
    if cfg.optimizer == "adamw":
        return SubspaceAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **subspace)
    return SubspaceSGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                       weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **subspace)


def micro_steps(opt, base: int, cfg: TrainConfig) -> int:
    """Micro-batches for the next step: ``base``, or ``factor * base`` before an L.B. GaLore refresh.

    ``opt`` is whatever knows the refresh schedule: the subspace optimizer, or the ``SubspaceModel`` of the
    wrapper path (both have ``refresh_due()``).
    """
    if not cfg.spec.large_batch:
        return base
    from golore_lab import microbatches

    return microbatches(opt, base, base * cfg.refresh_batch_factor)


def wrap_model(model: nn.Module, groups: list[dict], cfg: TrainConfig) -> tuple[nn.Module, list[dict]]:
    """The wrapper path's model and groups: ``SubspaceModel`` over the linears whose weights are in ``groups[0]``.

    ``groups`` are the task's optimizer-path groups (subspace matrices first). Each matrix must be the weight of
    an ``nn.Linear``; its layer is wrapped with the subspace keys of ``cfg`` and seeded with the matrix's index in
    the optimizer path's parameter list (so GoLore draws the same bases). Returns the ``SubspaceModel`` and the
    same groups with each matrix replaced by its factor (and each wrapped linear's bias by the wrapper's copy),
    every other key kept -- ready for :func:`make_optimizer`.
    """
    from golore_lab.wrapper import SubspaceModel

    linears = {id(mod.weight): (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    param_names = {id(p): name for name, p in model.named_parameters()}
    flat = [p for group in groups for p in group["params"]]
    positions, old = {}, {}
    for p in groups[0]["params"]:
        if id(p) not in linears:
            name = param_names.get(id(p), tuple(p.shape))
            raise ValueError(f"Invalid path: 'wrapper' wraps nn.Linear layers, but subspace parameter {name!r} is "
                             "not the weight of one (use path 'optimizer')")
        name, mod = linears[id(p)]
        positions[name] = next(i for i, q in enumerate(flat) if q is p)
        old[name] = mod
    wrapped = SubspaceModel(model, rank=cfg.rank, target_modules=list(positions), scale=cfg.scale,
                            update_proj_gap=cfg.update_proj_gap, proj_type=cfg.proj_type, projection="svd",
                            switch_step=cfg.switch_step, state_on_refresh=cfg.state_on_refresh, seed=cfg.seed,
                            positions=positions)
    if set(wrapped.layers) != set(positions):  # target_modules match by substring: check nothing else was caught
        extra = sorted(set(wrapped.layers) - set(positions))
        raise ValueError(f"Invalid path: 'wrapper' would also wrap {extra}, whose weights the task trains in full")
    new = {}
    for name, layer in wrapped.layers.items():
        new[id(old[name].weight)] = layer.factor
        if old[name].bias is not None:
            new[id(old[name].bias)] = layer.bias
    out = [{**group, "params": [new.get(id(p), p) for p in group["params"]]} for group in groups]
    return wrapped, out


@torch.no_grad()
def unwrapped_copy(wrapped: nn.Module) -> nn.Module:
    """A copy of the ``SubspaceModel``'s inner model with every wrapped layer back as an ``nn.Linear`` holding the
    merged weight W + scale·P B: the task's own architecture (``state_dict`` = ``wrapped.merged_state_dict()``)."""
    model = copy.deepcopy(wrapped.model)
    for name, layer in wrapped.layers.items():
        weight = layer.merged_weight()
        linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    device=weight.device, dtype=weight.dtype)   # no init: the global RNG is untouched
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def block_list(model: nn.Module) -> str:
    """The name of the ``nn.ModuleList`` holding most of ``model``'s parameters: its blocks, which FSDP2 shards one
    by one (``layers`` of the LLaMA, ``encoder.encoder.layer`` of the MiniLM classifier)."""
    lists = [(sum(p.numel() for p in module.parameters()), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError(f"Invalid fsdp: True for a {type(model).__name__}, which has no nn.ModuleList of blocks to "
                         "shard")
    return max(lists)[1]


def full_copy(task, sharded: nn.Module, seed: int, device: torch.device) -> nn.Module:
    """The task's plain model holding the full weights of the FSDP2-sharded ``sharded`` (a collective: every rank
    gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model = task.build_model(seed).to(device)
    model.load_state_dict(weights)
    return model


# ------------------------------------------------------------------------------------------ the interface
class TrainPath:
    """The model, optimizer and checkpoint format of one way of training (the optimizer path; base class).

    ``model`` is what is trained and evaluated, ``net`` what the loss runs through (``model``, or its DDP
    wrapper), ``opt`` the optimizer, ``refresher`` what knows the refresh schedule (L.B. GaLore's larger batch).
    """

    every_rank_evaluates = False   # FSDP: the forward all-gathers, so every rank runs the evaluation

    def __init__(self, task, cfg: TrainConfig, device: torch.device, world: int, rank: int):
        self.cfg, self.world, self.rank = cfg, world, rank
        self.model = task.build_model(cfg.seed).to(device)
        if cfg.checkpoint_activations:
            checkpoint_activations(self.model)
        self.groups = task.param_groups(self._shard(self.model), **cfg.subspace)

    def _shard(self, model: nn.Module) -> nn.Module:
        return model

    def fixed_bytes(self, micro_batches: int = 1) -> tuple[int, int, int, int]:
        """(weights, gradients, optimizer state, bases, workspace) bytes with ``micro_batches`` accumulated per
        step, for the micro-batch choice (:mod:`golore_lab.lm.memory`). Workspace: torch's AdamW on the CPU
        (one tensor at a time) forms sqrt(v) and its quotient, two temporaries of the largest parameter's size."""
        fixed = memory.model_bytes(self.model, self.groups, optimizer=self.cfg.optimizer, momentum=self.cfg.momentum,
                                   subspace=not self.cfg.spec.full)
        plain = self.cfg.spec.full and self.cfg.optimizer == "adamw"
        largest = max((p.numel() * p.element_size() for g in self.groups for p in g["params"]), default=0)
        return (*fixed, 2 * largest if plain else 0)

    def build_optimizer(self) -> None:
        self.opt = make_optimizer(self.groups, self.cfg)
        self.refresher = self.opt
        distributed = self.world > 1 and not self.every_rank_evaluates
        self.net = nn.parallel.DistributedDataParallel(self.model) if distributed else self.model

    def no_sync(self, last: bool):
        """Skip DDP's all-reduce on every micro-batch but the last of a step."""
        return self.net.no_sync() if self.net is not self.model and not last else contextlib.nullcontext()

    def before_forward(self, n_micro: int) -> None:
        """Called once per step before the first of its ``n_micro`` micro-batches."""

    def after_backward(self) -> None:
        """Called once per step after the last micro-batch's backward, before clipping."""

    def clip(self, max_norm: float) -> float:
        """Clip the full gradient to ``max_norm``; its norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def weights(self) -> dict:
        return {"model": self.model.state_dict()}

    def save(self, path: Path, payload: dict, step: int, previous_step: int | None) -> None:
        """Write the checkpoint: ``payload`` (the loop's state) plus the weights and the optimizer's state."""
        if self.rank == 0:
            save_checkpoint(path, {**self.weights(), "optimizer": self.opt.state_dict(), **payload}, previous_step)

    def load(self, path: Path, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def switch_log(self) -> list[dict]:
        """GoLore@auto's per-matrix switch records (empty for the other methods)."""
        return self.refresher.switch_log() if self.cfg.spec.auto else []

    def final_model(self, task, device: torch.device) -> nn.Module:
        """The trained model in the task's own architecture."""
        return self.model


OptimizerPath = TrainPath


class WrapperPath(TrainPath):
    """``SubspaceModel`` around the task's matrices and a plain torch optimizer over its factors."""

    def __init__(self, task, cfg: TrainConfig, device: torch.device, world: int, rank: int):
        super().__init__(task, cfg, device, world, rank)
        self.model, self.groups = wrap_model(self.model, self.groups, cfg)

    def fixed_bytes(self, micro_batches: int = 1) -> tuple[int, ...]:
        weights, gradients, state, bases = memory.model_bytes(self.model, self.groups, optimizer=self.cfg.optimizer,
                                                              momentum=self.cfg.momentum, subspace=False)
        if self.cfg.spec.switch_step(self.cfg.steps) != 0:   # SVD refreshes: the forward of a refresh step forms
            matrices = sum(layer.weight.numel() * layer.weight.element_size() for layer in self.model.layers.values())
            gradients += 2 * matrices                          # W + scale P B and captures G, both (m, n)
        return weights, gradients, state, bases

    def build_optimizer(self) -> None:
        super().build_optimizer()
        self.model.attach(self.opt)
        self.refresher = self.model

    def before_forward(self, n_micro: int) -> None:
        if self.model.refresh_due() and not self.model.refresh_needs_gradient():
            self.model.refresh(self.opt)  # random bases (GoLore): before the forward, nothing full-size formed or sent

    def after_backward(self) -> None:
        if self.model.refresh_due():
            self.model.refresh(self.opt)  # SVD of this step's full gradient (all-reduced explicitly under DDP)

    def clip(self, max_norm: float) -> float:
        return float(self.model.clip_grad_norm_(max_norm))  # the factors' P^T G; GoLore@auto's probes not in it

    def weights(self) -> dict:
        return {"model": self.model.merged_state_dict(), "wrapper": self.model.state_dict()}  # plain; exact state

    def load(self, path: Path, state: dict) -> None:
        self.model.load_state_dict(state["wrapper"])
        self.opt.load_state_dict(state["optimizer"])

    def final_model(self, task, device: torch.device) -> nn.Module:
        return unwrapped_copy(self.model)


class LayerwisePath(TrainPath):
    """The optimizer path, each parameter stepped in the backward (:func:`golore_lab.optim.layerwise`)."""

    def fixed_bytes(self, micro_batches: int = 1) -> tuple[int, int, int, int]:
        spec = self.cfg.spec
        random_only = spec.switch_step(self.cfg.steps) == 0   # golore@100: no SVD refresh ever
        how = "single" if micro_batches == 1 and not spec.large_batch else "subspace" if random_only else "gradient"
        return memory.model_bytes(self.model, self.groups, optimizer=self.cfg.optimizer, momentum=self.cfg.momentum,
                                  subspace=not spec.full, layerwise=how)

    def build_optimizer(self) -> None:
        from golore_lab.optim import SubspaceAdamW, SubspaceSGD, layerwise

        if self.cfg.spec.full:  # torch's rule in the full space, through the optimizer that has the hooks
            cfg, groups = self.cfg, [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                     for g in self.groups]
            self.opt = (SubspaceAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
                        if cfg.optimizer == "adamw" else
                        SubspaceSGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov))
        else:
            self.opt = make_optimizer(self.groups, self.cfg)
        self.refresher = self.opt
        ddp = self.world > 1 and not self.every_rank_evaluates   # DDP; FSDP2 calls the hooks on its shards itself
        self.net = nn.parallel.DistributedDataParallel(self.model) if ddp else self.model
        self.steps = layerwise(self.opt, ddp=self.net if ddp else None)

    def before_forward(self, n_micro: int) -> None:
        self.steps.expect(n_micro)


def checkpoint_activations(model: nn.Module) -> None:
    """Turn on activation checkpointing: the LLaMA's own switch (``checkpoint_activations``), or the
    ``gradient_checkpointing_enable`` of a transformers model inside ``model`` (non-reentrant)."""
    if hasattr(model, "checkpoint_activations"):
        model.checkpoint_activations = True
        return
    inner = [m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")]
    if not inner:
        raise ValueError(f"Invalid checkpoint_activations: True for a {type(model).__name__}, which has no "
                         "activation checkpointing (no checkpoint_activations attribute or transformers model)")
    inner[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class FSDPPath(TrainPath):
    """The task's model sharded with FSDP2; sharded checkpoints; the full weights gathered at the end."""

    every_rank_evaluates = True

    def _shard(self, model: nn.Module) -> nn.Module:
        from golore_lab.distributed import shard_model  # before the groups: parameters become row-sharded DTensors

        shard_model(model, blocks=block_list(model))
        return model

    def save(self, path: Path, payload: dict, step: int, previous_step: int | None) -> None:
        save_sharded_checkpoint(path, self.model, self.opt, payload, step, previous_step)   # a collective

    def load(self, path: Path, state: dict) -> None:
        load_sharded_checkpoint(path, self.model, self.opt)

    def final_model(self, task, device: torch.device) -> nn.Module:
        return full_copy(task, self.model, self.cfg.seed, device)   # every rank: one all-gather


class FSDPLayerwisePath(FSDPPath, LayerwisePath):
    """FSDP2 with each parameter's step taken when FSDP2 has reduce-scattered its gradient (FSDP2 runs a sharded
    parameter's post-accumulate-grad hooks then); sharded checkpoints."""


def make_path(task, cfg: TrainConfig, device: torch.device, world: int, rank: int) -> TrainPath:
    """The :class:`TrainPath` of ``cfg`` (its model built from ``cfg.seed``; the optimizer comes later, from
    :meth:`TrainPath.build_optimizer`)."""
    kind = ((FSDPLayerwisePath if cfg.layerwise else FSDPPath) if cfg.fsdp else WrapperPath if cfg.path == "wrapper"
            else LayerwisePath if cfg.layerwise else OptimizerPath)
    return kind(task, cfg, device, world, rank)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
