"""GaLore / GoLore by wrapping the model: frozen weights, low-rank trainable factors, plain torch optimizers.

The same algorithm as :class:`golore_lab.optim.SubspaceAdamW` / :class:`~golore_lab.optim.SubspaceSGD`, laid
out the way the authors' README does it. Each target ``nn.Linear`` becomes a :class:`SubspaceLinear` holding::

    weight  W  (m, n)   buffer, not trained by the optimizer (changed only by merges and weight decay)
    proj    P  (m, r)   buffer, the basis (left side; right side: Q (n, r))
    factor  B  (r, n)   the trainable parameter (right side: (m, r))
    forward     y = x (W + scale·P B)ᵀ + bias          (right side: W + scale·B Qᵀ)

Between refreshes only B (and the parameters that were never wrapped) receive gradients, so under DDP only
r × n numbers per wrapped matrix cross the network instead of m × n. At a refresh step t (``t % update_proj_gap
== 0``, the optimizer path's schedule) the training loop calls :meth:`SubspaceModel.refresh` between
``backward()`` and ``optimizer.step()``, which, for every wrapped layer:

1. takes the full gradient G of that step (m, n) -- at refresh steps only, the forward builds W + scale·P B as
   one tensor and a hook keeps its gradient Σ gyᵀ x (the layer's inputs and output gradients), summed over
   micro-batches -- and all-reduces it explicitly under DDP;
2. merges exactly: W ← W + scale·P B;
3. picks the new basis from G -- SVD (GaLore), random (GoLore), or the switch at ``switch_step`` -- with the
   optimizer path's generator ``refresh_generator(seed, position, t)``;
4. carries the torch optimizer's state of B to the new basis in place, with the optimizer path's own
   :func:`golore_lab.rules.refresh_state` (``state_on_refresh``: the authors' momentum projection for ``exp_avg`` /
   ``momentum_buffer``, ``exp_avg_sq`` as :func:`golore_lab.rules.carry_second_moment`; ``"reset"`` also restarts
   Adam's bias correction);
5. zeros B and sets B.grad = P_newᵀ G, so that the coming ``optimizer.step()`` is the optimizer path's step.

A random basis does not depend on G, so a GoLore refresh may instead be done *before* the step's forward
(:meth:`SubspaceModel.refresh_needs_gradient` is False): steps 2--4 and B ← 0 happen first, and backward
then gives B.grad = P_newᵀ G by itself. Same step, but nothing m × n is formed or all-reduced.

**Scale applied once.** The factor enters the forward as ``scale·B`` but its gradient is ``Pᵀ G`` -- not
``scale·Pᵀ G``, the true derivative -- because the scaling is an autograd function whose backward is the
identity (:class:`_ScaleForward`). A torch optimizer step then moves the weight by ``−lr·scale·P N(PᵀG)``,
exactly the optimizer path's update. (The authors' wrapper also scales the gradient, which gives an effective
``scale²`` for SGD and a rescaled ε for Adam.)

**Weight decay.** ``torch.optim.AdamW``'s decoupled decay of B is completed by decaying W by the same factor
``(1 − lr·weight_decay)`` after each step (a step hook installed by :meth:`SubspaceModel.attach`), which is the
optimizer path's decay of the whole matrix. ``torch.optim.SGD``'s coupled decay would add ``wd·B`` to the
gradient where the optimizer path adds ``wd·Pᵀ W_eff``: groups holding factors must have ``weight_decay=0`` for
SGD (and plain Adam); :meth:`attach` refuses otherwise.

**What differs on purpose from a naive comparison.** ``torch.optim.AdamW``'s default ``weight_decay`` is 0.01,
``SubspaceAdamW``'s is 0: pass it explicitly. Gradient clipping over ``model.parameters()`` sees the factors'
gradients Pᵀ G (norm ≤ ‖G‖), where the optimizer path clips the full G: the two paths coincide without
clipping (or with clipping that does not bite). Random bases are seeded by (``seed``, ``position``, step) as in
the optimizer path; ``position`` defaults to the layer's index among the wrapped layers, i.e. the optimizer
path's index when its first param group holds exactly these weights in module order.

**DDP.** Wrap the :class:`SubspaceModel` itself: ``DistributedDataParallel(SubspaceModel(net, ...))``. W and P
are declared ignored (``_ddp_params_and_buffers_to_ignore``), so DDP neither broadcasts them nor gives them
bucket space; between refreshes DDP all-reduces only the factors and the unwrapped parameters. At a refresh
:meth:`SubspaceModel.refresh` all-reduces the full gradients explicitly (one flat all-reduce), and every rank
then computes the same SVD or draws the same random basis, so the ranks stay identical without broadcasts.

**Large-batch GaLore.** Accumulate more micro-batches when :meth:`SubspaceModel.refresh_due` is True; the
captured full gradient accumulates over them like ``.grad`` does.

**GoLore@auto** (``switch_step="auto"``). Each layer takes the optimizer path's test (:mod:`golore_lab.switching`,
``docs/when_to_switch.md``) at each refresh, on the period that ends: does the SVD basis capture less of the true
gradient than a random one? The test needs two views of each step's gradient G: R_t = PᵀG, which is the factor's
gradient, and Π_jᵀG on a probe basis Π_j (m, q), q = min(r, m − r), Haar-random in the complement of span(P),
drawn fresh for each pair of steps at its first step from the stream (``seed``, −1 − ``position``, step) as on
the optimizer path (right side: G Q and G Π_j, Π_j (n, q)). The second comes without forming G: the layer holds a *probe factor* C, (q, n) (right side
(m, q)), a parameter that stays zero and enters the layer through an identity whose backward sets
C.grad = ΠᵀG = Σ (gy Π)ᵀ x (:class:`_ProbeView`) -- two thin products in the backward, no extra forward or
backward, nothing m × n. C.grad accumulates over micro-batches, and DDP averages it with the factors' gradients
(C is a parameter of the wrapped module): every rank sees the same views and takes the same decisions with no
collective of its own, for q × n more numbers per matrix in DDP's all-reduce. The optimizer's pre-step hook
(:meth:`SubspaceModel.attach`) adds the two views to the period once per step -- not at a refresh step, whose
noise P was fitted to -- and clears C.grad, so an optimizer built over ``model.parameters()`` holds C but never
steps it. A layer that has switched refreshes randomly for good; its C then gets a zero gradient, computed from
nothing (DDP expects a gradient for each of its parameters at every step, so C stays in the graph). The
statistic's state -- the period's open pair, probe and pair products, or the decision -- travels in the layer's
``_extra_state``; :meth:`SubspaceModel.switch_log` lists the switches with the optimizer path's keys. Clip with
:meth:`SubspaceModel.clip_grad_norm_`, which scales C's gradient with the others but leaves it out of the norm.
A layer whose basis spans its projected side (r = m) has no probe and never switches, as on the optimizer path.

The authors' names, for users of their README::

    ReLoRaModel(model, r, target_modules, scale, ...)  →  SubspaceModel(model, rank, target_modules, scale, ...)
    ReLoRaLinear                                      →  SubspaceLinear (lora_A/lora_B → proj P / factor B)
    model._config.forward_type = reset_relora         →  nothing: layers capture the full gradient by themselves
                                                         when refresh_due() (their forward_type=True step)
    model.merge_and_reinit(optimizer, use_rand)       →  model.refresh(optimizer) (schedule from projection and
                                                         switch_step), or refresh(optimizer, projection="random")
    --rand_ratio 0.8 (the SVD's share of T steps)    →  switch_fraction=0.2, total_steps=T (the random share:
                                                         GoLore@20%, switch_step = round(0.8·T))

Example -- GoLore@20% over 1000 steps with AdamW::

    model = SubspaceModel(net, rank=128, target_modules=["attn", "mlp"], update_proj_gap=200, switch_step=800)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.attach(opt)
    for batch in batches:
        if model.refresh_due() and not model.refresh_needs_gradient():
            model.refresh(opt)          # GoLore: before the forward, no full gradient needed
        loss_fn(model, batch).backward()
        if model.refresh_due():
            model.refresh(opt)          # GaLore: SVD of this step's full gradient
        opt.step(); opt.zero_grad()
    torch.save(model.merged_state_dict(), "plain.pt")   # loads into the unwrapped architecture
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import projection as proj
from . import rules
from . import spec
from . import switching

__all__ = ["SubspaceLinear", "SubspaceModel"]


class _ScaleForward(torch.autograd.Function):
    """``scale·B`` in the forward, identity in the backward: B.grad = Pᵀ G, and the step applies scale once."""

    @staticmethod
    def forward(ctx, factor: Tensor, scale: float) -> Tensor:
        return factor * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ProbeView(torch.autograd.Function):
    """The identity on the layer's output y, whose backward also hands the zero probe factor C the probe's view of
    the layer's gradient G = Σ gyᵀ x (m, n): C.grad = ΠᵀG = Σ (gy Π)ᵀ x (q, n) on the left side, G Π = Σ gyᵀ (x Π)
    (m, q) on the right, with Π the probe basis (m, q) or (n, q).

    ``probe`` None: C.grad = 0, computing nothing (a refresh step, or a layer that has switched). C still gets a
    gradient then, because DDP expects one for each of its parameters at every step. The left side keeps x, which
    the factor's product saves anyway; the right side keeps x Π (.., q) instead of x.
    """

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, probe_factor: Tensor, probe: Tensor | None, side: str) -> Tensor:
        ctx.shape, ctx.dtype, ctx.side = probe_factor.shape, probe_factor.dtype, side
        ctx.active = probe is not None
        if ctx.active:
            ctx.save_for_backward(x if side == "left" else x.to(probe.dtype) @ probe, probe)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor, None, None]:
        if not ctx.active:
            return grad, None, grad.new_zeros(ctx.shape, dtype=ctx.dtype), None, None
        kept, probe = ctx.saved_tensors
        gy = grad.reshape(-1, grad.shape[-1]).to(probe.dtype)                   # (N, m)
        kept = kept.reshape(-1, kept.shape[-1]).to(probe.dtype)                 # (N, n) or (N, q)
        view = (gy @ probe).T @ kept if ctx.side == "left" else gy.T @ kept     # (q, n) or (m, q)
        return grad, None, view.to(ctx.dtype), None, None


class SubspaceLinear(nn.Module):
    """A linear layer W + scale·P B with frozen ``weight`` W, basis ``proj`` P and trainable ``factor`` B.

    Built from an ``nn.Linear`` by :class:`SubspaceModel`; ``weight`` and ``bias`` keep ``nn.Linear``'s names and
    shapes, so a merged state dict is an ``nn.Linear`` state dict. ``side`` is the optimizer's
    ``projected_side(weight.shape, proj_type)``: ``"left"`` gives P (m, r), B (r, n); ``"right"`` gives
    Q (n, r), B (m, r). ``position`` is the parameter index the optimizer path would give this weight (with
    ``seed``, it seeds the random bases and GoLore@auto's probes); ``step`` counts optimizer steps taken on the
    factor.

    GoLore@auto (``auto``): ``auto_state`` holds the statistic's state (:data:`golore_lab.switching.STATE_KEYS`,
    the optimizer path's per-parameter entries), and ``probe_factor`` C, (q, n) on the left side or (m, q) on the
    right with q = min(r, d − r), is a zero parameter whose gradient is the probe's view of G (:class:`_ProbeView`);
    it is None when the basis spans the whole side (q = 0: nothing lies outside, the layer never switches).
    """

    def __init__(self, linear: nn.Linear, name: str, rank: int, scale: float, side: str, position: int,
                 update_proj_gap: int, auto: bool = False, seed: int = 0):
        super().__init__()
        self.seed = seed
        m, n = linear.weight.shape
        self.name, self.rank, self.scale, self.side, self.position = name, rank, float(scale), side, position
        self.update_proj_gap = update_proj_gap
        self.in_features, self.out_features = n, m
        weight = linear.weight.detach().clone()
        self.register_buffer("weight", weight)                                  # (m, n)
        basis_dim = m if side == "left" else n
        self.register_buffer("proj", weight.new_zeros(basis_dim, rank))          # (m, r) or (n, r)
        factor_shape = (rank, n) if side == "left" else (m, rank)
        self.factor = nn.Parameter(weight.new_zeros(factor_shape))              # (r, n) or (m, r)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        probe_rank = min(rank, basis_dim - rank)
        self.auto_state: dict[str, Any] | None = {} if auto else None
        self.probe_factor = (nn.Parameter(weight.new_zeros((probe_rank, n) if side == "left" else (m, probe_rank)))
                             if auto and probe_rank > 0 else None)             # (q, n) or (m, q), always zero
        self.step = 0
        self.full_grad: Tensor | None = None   # G (m, n) of the current refresh step, summed over micro-batches
        self._refreshed_at: int | None = None
        self._probe: tuple[int, Tensor | None] | None = None  # (step, its pair probe): drawn once per step

    @property
    def due(self) -> bool:
        """True while the coming optimizer step is a refresh step not yet refreshed: the forward then captures
        the full gradient."""
        return self.step % self.update_proj_gap == 0 and self._refreshed_at != self.step

    # the step counter and GoLore@auto's state travel in the state dict (as `_extra_state`), the captured
    # gradient does not
    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, **(self.auto_state or {})}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if self.auto_state is not None:
            switching.check_period(state, f"layer {self.name!r}")
            self.auto_state = {key: value.to(self.weight.device) if torch.is_tensor(value) else value
                               for key, value in state.items() if key in switching.STATE_KEYS}
        self.full_grad, self._refreshed_at, self._probe = None, None, None

    def _active_probe(self) -> Tensor | None:
        """GoLore@auto's pair probe Π_j when this step's views go into the period, else None (a refresh step, no
        period, or the period's last step when it would open a pair): :func:`golore_lab.switching.next_probe`,
        drawn once per step (a fresh one at the first step of a pair)."""
        if (self.probe_factor is None or self.step % self.update_proj_gap == 0
                or "auto_steps" not in self.auto_state):
            return None
        if self._probe is None or self._probe[0] != self.step:
            seed = proj.derive_seed(self.seed, -1 - self.position, self.step)
            self._probe = (self.step, switching.next_probe(self.auto_state, self.proj, seed, self.update_proj_gap))
        return self._probe[1]

    def _accumulate_period(self) -> None:
        """GoLore@auto, once per optimizer step (after the micro-batches and DDP's all-reduce, before the step):
        add the step's views R_t = B.grad = PᵀG and C.grad = ΠᵀG to the period, then clear C.grad so that an
        optimizer holding C never steps it."""
        if self.probe_factor is None:
            return
        probe = self._active_probe()
        if self.factor.grad is not None and self.probe_factor.grad is not None and probe is not None:
            switching.accumulate(self.auto_state, self.factor.grad, self.probe_factor.grad, probe)
        self.probe_factor.grad = None

    def delta(self) -> Tensor:
        """scale·P B (m, n): what the factor adds to W."""
        b = self.factor.detach() * self.scale
        return self.proj @ b if self.side == "left" else b @ self.proj.T

    def merged_weight(self) -> Tensor:
        """W + scale·P B (m, n), the weight of the equivalent ``nn.Linear``."""
        return self.weight + self.delta()

    def forward(self, x: Tensor) -> Tensor:
        b = _ScaleForward.apply(self.factor, self.scale) if self.scale != 1.0 else self.factor
        if self.due and torch.is_grad_enabled():
            # refresh step: form the effective weight, whose gradient is the full G = Σ gyᵀ x
            full = self.weight + (self.proj @ b if self.side == "left" else b @ self.proj.T)  # (m, n)
            full.register_hook(self._accumulate)
            y = F.linear(x, full, self.bias)
        elif self.side == "left":
            y = F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, b), self.proj)  # x Bᵀ (.., r), Pᵀ: (.., m)
        else:
            y = F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.proj.T), b)  # x Q (.., r), Bᵀ
        if self.probe_factor is not None and torch.is_grad_enabled():
            y = _ProbeView.apply(y, x, self.probe_factor, self._active_probe(), self.side)
        return y

    def _accumulate(self, grad: Tensor) -> None:
        self.full_grad = grad.detach().clone() if self.full_grad is None else self.full_grad.add_(grad)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, side={self.side!r}, scale={self.scale}, bias={self.bias is not None}")


class SubspaceModel(nn.Module):
    """Wrap ``model``: every ``nn.Linear`` chosen by ``target_modules`` becomes a :class:`SubspaceLinear`. See
    the module docstring for the algorithm.

    ``target_modules`` (:func:`golore_lab.spec.select_linears`): substrings of the qualified module name (as the
    authors' README: ``["attn", "mlp"]``), a predicate ``(name, module) -> bool``, the modules themselves (one
    or a list), or ``None`` (default) for every ``nn.Linear``. A substring that matches nothing, a module that is
    not an ``nn.Linear`` of ``model`` and a layer smaller than the rank are errors naming them.

    The other arguments are the optimizer path's param-group keys, checked by :func:`golore_lab.spec.check_subspace`
    with the same messages: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``projection`` (``"svd"``,
    ``"random"`` or a projector callable), ``switch_step`` (GoLore@x%; or ``switch_fraction`` with
    ``total_steps``; ``"auto"``: GoLore@auto, see the module docstring), ``state_on_refresh`` and ``seed``.
    ``positions`` maps a wrapped layer's name to the index its weight would have in the optimizer path's
    parameter list (it seeds GoLore's bases and GoLore@auto's probes); by default layer i (in ``named_modules()``
    order) gets i, which is what :func:`golore_lab.spec.subspace_param_groups` gives.

    The wrapped ``model`` is modified in place and held as ``self.model``; the buffers W and P are
    registered with DDP as ignored, so ``DistributedDataParallel(SubspaceModel(...))`` neither broadcasts
    them nor reserves bucket space for them.
    """

    def __init__(self, model: nn.Module, rank: int, target_modules: spec.Targets | None = None,
                 scale: float = 1.0, update_proj_gap: int = 200, proj_type: str = "std",
                 projection: Any = "svd", switch_step: int | str | None = None, state_on_refresh: str = "project",
                 seed: int = 0, positions: dict[str, int] | None = None, *, switch_fraction: float | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__()
        settings = spec.check_subspace(dict(
            rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projection=projection,
            switch_step=switch_step, switch_fraction=switch_fraction, total_steps=total_steps,
            state_on_refresh=state_on_refresh, seed=seed))
        if settings["rank"] is None:
            raise ValueError("Invalid rank: None (SubspaceModel needs an integer rank >= 1)")
        self.update_proj_gap, self.projection, self.switch_step = (settings["update_proj_gap"],
                                                                   settings["projection"], settings["switch_step"])
        self.state_on_refresh, self.seed = settings["state_on_refresh"], settings["seed"]

        targets = spec.select_linears(model, target_modules)
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} selects no nn.Linear of {type(model).__name__}")
        for name, mod in targets:
            spec.check_rank_fits(settings["rank"], tuple(mod.weight.shape), repr(f"{name}.weight"))
        positions = dict(positions or {})
        unknown = sorted(set(positions) - {name for name, _ in targets})
        if unknown:
            raise ValueError(f"positions names layer(s) {unknown} that are not wrapped")
        for name, position in positions.items():
            if not (spec.is_int(position) and position >= 0):
                raise ValueError(f"Invalid position of layer {name!r}: {position!r} (must be an integer >= 0)")
        self.layers: dict[str, SubspaceLinear] = {}
        for i, (name, mod) in enumerate(targets):
            side = proj.projected_side(tuple(mod.weight.shape), settings["proj_type"])
            layer = SubspaceLinear(mod, name, settings["rank"], settings["scale"], side, int(positions.get(name, i)),
                                   settings["update_proj_gap"], auto=settings["switch_step"] == "auto",
                                   seed=settings["seed"])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers[name] = layer
        self.model = model
        self._ddp_params_and_buffers_to_ignore = [f"model.{name}.{buf}" for name in self.layers
                                                  for buf in ("weight", "proj")]
        self._hooks: list[RemovableHandle] = []
        self._attached: torch.optim.Optimizer | None = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------- schedule
    def refresh_due(self) -> bool:
        """True when the coming ``optimizer.step()`` must be preceded by :meth:`refresh` (step % gap == 0).

        While True, the layers capture the full gradient during backward (the authors' ``forward_type=True``).
        A large-batch GaLore loop takes its larger batch exactly when this is True.
        """
        return any(layer.due for layer in self.layers.values())

    def refresh_needs_gradient(self, projection: Any = None) -> bool:
        """True when the due refresh needs this step's full gradient (SVD or a user projector); False when all
        due layers draw random bases (GoLore), whose refresh may then be done *before* the forward.

        Refreshing GoLore before the forward gives the same step -- the basis does not depend on G, and
        backward then yields B.grad = P_newᵀ G by itself -- with no full gradient formed or all-reduced, so
        such steps cost what a step between refreshes costs.
        """
        return any(self._plan(layer, projection)[0] != "random" for layer in self.layers.values() if layer.due)

    def _plan(self, layer: SubspaceLinear, projection: Any) -> tuple[str, Any, switching.SwitchTest | None]:
        """The due refresh of ``layer``: its kind, its projector and GoLore@auto's test of the period that ends
        (None: not auto, switched already, too few pairs, or ``projection`` given, which overrides the schedule
        and takes no decision). Changes nothing."""
        if projection is not None:
            return ("custom" if callable(projection) else projection), proj.resolve(projection), None
        test = None
        if self.switch_step == "auto":
            done = switching.switched(layer.auto_state)
            test = None if done else switching.decide(layer.auto_state, layer.rank)
            if done or (test is not None and test.switch):
                return "random", proj.random_projection, test
        elif self.switch_step is not None and layer.step >= self.switch_step:
            return "random", proj.random_projection, None
        kind = self.projection if isinstance(self.projection, str) else "custom"
        return kind, proj.resolve(self.projection), test

    # ---------------------------------------------------------------- optimizer protocol
    def attach(self, optimizer: torch.optim.Optimizer) -> "SubspaceModel":
        """Check that ``optimizer`` can train the factors and install its step hooks; call once per optimizer.

        Supported: ``torch.optim.AdamW`` (any weight decay), ``torch.optim.Adam`` and ``torch.optim.SGD``
        (``weight_decay=0`` on groups holding factors), without ``amsgrad`` or ``maximize``. The hooks
        (a) refuse a step when a refresh was due and :meth:`refresh` was not called, (b) after the step,
        count it and apply AdamW's decoupled decay to W.
        """
        if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)):
            raise TypeError(f"Unsupported optimizer {type(optimizer).__name__}: the factors' state can be carried "
                            "across refreshes for torch.optim.AdamW, Adam and SGD")
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        decoupled = isinstance(optimizer, torch.optim.AdamW) or any(g.get("decoupled_weight_decay") for g in
                                                                     optimizer.param_groups)
        for name, layer in self.layers.items():
            group = group_of.get(id(layer.factor))
            if group is None:
                raise ValueError(f"The optimizer does not hold the factor of layer {name!r}: build it over "
                                 "model.parameters() (or include every '.factor')")
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError(f"Layer {name!r}: amsgrad and maximize are not supported for factors")
            if group["weight_decay"] and not decoupled:
                raise ValueError(
                    f"Layer {name!r}: {type(optimizer).__name__} with weight_decay={group['weight_decay']} on a "
                    "factor decays B instead of the merged weight; use weight_decay=0 for the factors' group "
                    "(or torch.optim.AdamW, whose decoupled decay the wrapper completes exactly)")
        for handle in self._hooks:
            handle.remove()
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]
        self._attached = optimizer
        return self

    def _check_attached(self, optimizer: torch.optim.Optimizer) -> None:
        if self._attached is not optimizer:
            raise RuntimeError("Call model.attach(optimizer) once, after building the optimizer, before training "
                               "(it installs the step counting and the weight decay of W)")

    def _before_step(self, optimizer, args, kwargs) -> None:
        for name, layer in self.layers.items():
            if layer.factor.grad is not None and layer.due:
                raise RuntimeError(f"Layer {name!r} is due for a refresh at step {layer.step}: call "
                                   "model.refresh(optimizer) after backward() and before optimizer.step()")
        for layer in self.layers.values():
            layer._accumulate_period()

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for layer in self.layers.values():
            if layer.factor.grad is None:
                continue
            group = group_of[id(layer.factor)]
            if group["weight_decay"]:
                layer.weight.mul_(1 - group["lr"] * group["weight_decay"])
            layer.step += 1
            layer.full_grad = None

    # ---------------------------------------------------------------- the refresh
    @torch.no_grad()
    def refresh(self, optimizer: torch.optim.Optimizer, projection: Any = None,
                process_group: Any = None) -> int:
        """Merge, pick new bases, carry the optimizer state, re-zero the factors; before ``optimizer.step()``.

        Acts on every layer that is due (see the module docstring for the five steps). ``projection``
        overrides the schedule for this refresh (``"svd"``, ``"random"`` or a projector), as the authors'
        ``merge_and_reinit(optimizer, use_rand)``. Under ``torch.distributed`` the full gradients are averaged
        over ``process_group`` in one all-reduce. Returns the number of bytes this rank all-reduced.

        Called after ``backward()`` it uses the captured full gradients. Called before the forward of the step
        (no gradient captured, factors' ``.grad`` None), it is allowed when :meth:`refresh_needs_gradient` is
        False: random bases are drawn, nothing is all-reduced, and backward fills the factors' gradients.
        """
        self._check_attached(optimizer)
        due = [layer for layer in self.layers.values() if layer.due]
        if not due:
            steps = sorted({layer.step for layer in self.layers.values()})
            raise RuntimeError(f"refresh() called at step {steps[0] if len(steps) == 1 else steps}, when no layer "
                               f"is due (update_proj_gap={self.update_proj_gap}, or refreshed already); "
                               "check model.refresh_due()")
        before_forward = all(layer.full_grad is None and layer.factor.grad is None for layer in due)
        if before_forward and not self.refresh_needs_gradient(projection):
            self._refresh_all(due, [None] * len(due), optimizer, projection)
            return 0
        for layer in due:
            if layer.full_grad is None:
                kind = self._plan(layer, projection)[0]
                raise RuntimeError(
                    f"Layer {layer.name!r} has no full gradient for its {kind} refresh at step {layer.step}: run "
                    "forward and backward on this step's batch with gradients enabled (the layers capture the "
                    "gradient while model.refresh_due() is True), then refresh(optimizer)")
        grads = [layer.full_grad for layer in due]
        sent = 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=process_group)
            flat.div_(dist.get_world_size(process_group))
            sent = flat.numel() * flat.element_size()
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        for layer, grad in zip(due, grads):
            if not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(f"Non-finite full gradient in layer {layer.name!r} at step {layer.step}; "
                                         "refresh skipped, nothing was changed")
        self._refresh_all(due, grads, optimizer, projection)
        return sent

    def _refresh_all(self, due: list[SubspaceLinear], grads: list[Tensor | None], optimizer: torch.optim.Optimizer,
                     projection: Any) -> None:
        """Every new basis and every check first, then the changes: a refused refresh changes nothing."""
        plans = [self._plan(layer, projection) for layer in due]
        bases = [self._new_basis(layer, grad, kind, projector) for layer, grad, (kind, projector, _) in
                 zip(due, grads, plans)]
        for layer in due:
            # torch.optim documents no API naming what a state entry means, so rules.py holds the one table of
            # torch's names; an entry it does not know (a future torch) is refused, not left in the old basis.
            unknown = sorted(set(optimizer.state.get(layer.factor, ())) -
                             {"step", *rules.FIRST_MOMENTS, *rules.SECOND_MOMENTS})
            if unknown:
                raise RuntimeError(f"The optimizer's state of layer {layer.name!r}'s factor has entries {unknown} "
                                   "that the wrapper cannot carry to a new basis (known: step, "
                                   f"{', '.join(rules.FIRST_MOMENTS + rules.SECOND_MOMENTS)}); nothing was changed")
        for layer, grad, new, (_, _, test) in zip(due, grads, bases, plans):
            self._refresh_layer(layer, grad, new, optimizer, test)

    def _new_basis(self, layer: SubspaceLinear, grad: Tensor | None, kind: str, projector: Any) -> Tensor:
        generator = proj.refresh_generator(self.seed, layer.position, layer.step)
        shape_only = torch.empty_like(layer.weight, device="meta")           # random bases read only the shape
        new = projector(shape_only if grad is None else grad, layer.rank, layer.side, generator)
        if kind == "custom":
            dim = layer.weight.shape[0] if layer.side == "left" else layer.weight.shape[1]
            try:
                proj.check_basis(new, dim, layer.rank)
            except ValueError as error:
                raise ValueError(f"The projector {spec.describe_setting(projector)} for layer {layer.name!r} "
                                 f"({layer.side} side, rank {layer.rank}) {error}; nothing was changed") from None
        return new.to(device=layer.weight.device, dtype=layer.weight.dtype)

    def _refresh_layer(self, layer: SubspaceLinear, grad: Tensor | None, new: Tensor,
                       optimizer: torch.optim.Optimizer, test: switching.SwitchTest | None) -> None:
        count = layer.step
        state = optimizer.state.get(layer.factor)
        if count > 0:
            layer.weight.add_(layer.delta())                                    # exact merge: W ← W + scale·P B
            if state:
                self._carry(state, layer.side, proj.transport(layer.side, layer.proj, new))
        layer.proj.copy_(new)
        layer.factor.zero_()
        if grad is not None:
            projected = new.T @ grad if layer.side == "left" else grad @ new  # (r, n) or (m, r)
            if layer.factor.grad is None:
                layer.factor.grad = projected.to(layer.factor.dtype)
            else:
                layer.factor.grad.copy_(projected)
        layer.full_grad = None
        layer._refreshed_at = count
        if layer.auto_state is not None and not switching.switched(layer.auto_state):
            self._start_or_switch(layer, new, count, test)

    def _start_or_switch(self, layer: SubspaceLinear, new: Tensor, count: int,
                         test: switching.SwitchTest | None) -> None:
        """GoLore@auto at a refresh, as the optimizer path's ``_auto_update``: record the switch, or start the
        period of the new basis (its pairs' probes are drawn at their first steps, :meth:`SubspaceLinear._active_probe`,
        from the stream (seed, −1 − position, step) that no random basis uses: independent of the noise, the same
        on every DDP rank)."""
        layer._probe = None
        if test is not None and test.switch:
            switching.record(layer.auto_state, count, test)
        elif layer.probe_factor is not None:
            switching.start_period(layer.auto_state, new, tuple(layer.factor.shape), layer.side)

    def _carry(self, state: dict[str, Any], side: str, transport: Tensor) -> None:
        rules.refresh_state(state, self.state_on_refresh, side, transport)
        if self.state_on_refresh == "reset" and torch.is_tensor(state.get("step")):
            state["step"].zero_()           # torch.optim.Adam(W)'s bias correction restarts with the moments

    # ---------------------------------------------------------------- checkpoints
    def merged_state_dict(self) -> dict[str, Tensor]:
        """An ordinary state dict of the unwrapped architecture, with weights W + scale·P B (tensors only)."""
        out = {}
        for key, value in self.model.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            if prefix in self.layers and leaf in ("proj", "factor", "probe_factor", "_extra_state"):
                continue
            if prefix in self.layers and leaf == "weight":
                value = self.layers[prefix].merged_weight()
            out[key] = value.detach().clone()
        return out

    def factor_parameters(self) -> Iterable[nn.Parameter]:
        """The trainable factors B, one per wrapped layer (for optimizer groups of their own)."""
        return (layer.factor for layer in self.layers.values())

    def probe_parameters(self) -> Iterable[nn.Parameter]:
        """GoLore@auto's probe factors C (zero, never stepped), one per wrapped layer that has one."""
        return (layer.probe_factor for layer in self.layers.values() if layer.probe_factor is not None)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)`` with the probe factors left out of the
        norm but scaled with the rest: the norm is that of the gradients the optimizer steps on, and GoLore@auto's
        statistic sees both views of the clipped gradient, as on the optimizer path. Returns the total norm."""
        probes = {id(p) for p in self.probe_parameters()}
        params = list(self.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None and id(p) not in probes])
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ---------------------------------------------------------------- GoLore@auto
    def switch_log(self) -> list[dict[str, Any]]:
        """GoLore@auto's switches so far, one record per switched layer in position order, with the keys of
        :meth:`golore_lab.optim.SubspaceOptimizer.switch_log`: ``name`` (the wrapped weight, ``"<layer>.weight"``),
        ``position``, ``step`` (the refresh whose basis was the first random one), ``signal``,
        ``random_signal`` and ``t``. Rebuilt from the layers' state, so it survives a checkpoint."""
        log = [{"name": f"{layer.name}.weight", "position": layer.position, "step": state["auto_switched_at"],
                "signal": state["auto_signal"], "random_signal": state["auto_random_signal"], "t": state["auto_t"]}
               for layer in self.layers.values()
               if (state := layer.auto_state) is not None and switching.switched(state)]
        return sorted(log, key=lambda entry: entry["position"])
