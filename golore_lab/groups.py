"""What gets a rank: the param groups of a model for the subspace optimizers (re-exported by
:mod:`golore_lab.spec`, where the settings they carry are checked)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from .spec import _integer, check_subspace

Targets = Sequence[str] | Callable[[str, nn.Module], bool] | nn.Module | Sequence[nn.Module] | str


def select_linears(model: nn.Module, target_modules: Targets | None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` named by ``target_modules``, as (qualified name, module), in
    ``named_modules()`` order.

    ``target_modules`` is one of: substrings of the qualified module name (a str or a list of them, as the
    authors' README: ``["attn", "mlp"]``); a predicate ``(name, module) -> bool``; modules of ``model`` (one or
    a list); or ``None`` for every ``nn.Linear``. A substring that matches no ``nn.Linear``, or a module that
    is not an ``nn.Linear`` of ``model``, is a ``ValueError`` naming it (a typo would otherwise train nothing
    in the subspace).
    """
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if target_modules is None:
        return linears
    if isinstance(target_modules, (str, nn.Module)):
        target_modules = [target_modules]
    if callable(target_modules):
        return [(name, mod) for name, mod in linears if target_modules(name, mod)]
    items = list(target_modules)
    if all(isinstance(item, nn.Module) for item in items):
        wanted = {id(item) for item in items}
        for item in items:
            if not any(item is mod for _, mod in linears):
                raise ValueError(f"Target module {type(item).__name__} {_short(item)} is not an nn.Linear of "
                                 f"{type(model).__name__}")
        return [(name, mod) for name, mod in linears if id(mod) in wanted]
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"Invalid target_modules: {target_modules!r} (must be substrings of module names, a "
                         "predicate (name, module) -> bool, or modules of the model)")
    for pattern in items:
        if not any(pattern in name for name, _ in linears):
            names = [name for name, _ in linears]
            more = " ..." if len(names) > 8 else ""
            raise ValueError(f"Target module pattern {pattern!r} matches no nn.Linear of {type(model).__name__} "
                             f"(its linears: {names[:8]}{more})")
    return [(name, mod) for name, mod in linears if any(pattern in name for pattern in items)]


def _short(module: nn.Module) -> str:
    text = repr(module).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Choice:
    """Where :func:`subspace_param_groups` put one parameter, and why."""

    name: str
    shape: tuple[int, ...]
    rank: int | None
    reason: str


def subspace_param_groups(model: nn.Module, rank: int, target_modules: Targets | None = None, min_dim: int = 0,
                          **group_keys: Any) -> list[dict[str, Any]]:
    """galore-style param groups: ``[{"params": matrices, "rank": rank, **group_keys}, {"params": the rest}]``.

    A parameter gets the rank when it is the weight of an ``nn.Linear`` chosen by ``target_modules`` (see
    :func:`select_linears`; ``None``: every ``nn.Linear``) with min(m, n) >= max(rank, min_dim). Everything
    else -- embeddings, heads smaller than the rank, norms, biases, linears not targeted -- goes to a
    full-space group (plain AdamW / SGD). Both groups carry ``param_names``; :func:`describe_param_groups`
    lists the choice by name. The rank group comes first and keeps ``named_parameters()`` order, which is the
    order :class:`golore_lab.wrapper.SubspaceModel` gives its layers' default positions (the random bases then
    agree). A parameter shared by several modules (tied weights) is listed once, under its first name; frozen
    parameters (``requires_grad=False``) are left out.
    ``group_keys`` (``update_proj_gap``, ``scale``, ``switch_fraction`` ...) go to the rank group and are
    validated like the optimizer's. The full-space group is left out when empty; no matrix qualifying is a
    ``ValueError``.

    Example::

        groups = subspace_param_groups(model, rank=128, target_modules=["attn", "mlp"], update_proj_gap=200)
        print(describe_param_groups(groups))
        opt = SubspaceAdamW(groups, lr=1e-3, weight_decay=0.01)
    """
    settings = check_subspace({"rank": rank, **group_keys})
    rank = settings["rank"]
    if rank is None:
        raise ValueError("Invalid rank: None (subspace_param_groups needs an integer rank >= 1)")
    min_dim = _integer("min_dim", min_dim, 0)
    targeted = {id(mod.weight) for _, mod in select_linears(model, target_modules)}
    matrices: list[tuple[str, nn.Parameter]] = []
    others: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in targeted and p.dim() == 2 and min(p.shape) >= max(rank, min_dim):
            matrices.append((name, p))
        else:
            others.append((name, p))
    if not matrices:
        raise ValueError(f"No matrix qualifies for rank {rank}: no targeted nn.Linear weight has "
                         f"min(m, n) >= max(rank, min_dim) = {max(rank, min_dim)}")
    groups = [{"params": [p for _, p in matrices], "param_names": [n for n, _ in matrices], "rank": rank,
               **group_keys}]
    if others:
        groups.append({"params": [p for _, p in others], "param_names": [n for n, _ in others]})
    return groups


def param_group_choices(groups: Iterable[Mapping[str, Any]]) -> list[Choice]:
    """One :class:`Choice` per parameter of ``groups`` (as :func:`subspace_param_groups` builds them), in order.

    The reason a matrix stayed in the full space is read from its shape: below the largest rank of the
    groups, or else not a targeted ``nn.Linear`` weight (or below ``min_dim``).
    """
    groups = list(groups)
    out = []
    ranks = [g["rank"] for g in groups if g.get("rank") is not None]
    for index, group in enumerate(groups):
        names = group.get("param_names") or [f"param_groups[{index}]['params'][{i}]"
                                             for i in range(len(group["params"]))]
        rank = group.get("rank")
        for name, p in zip(names, group["params"]):
            shape = tuple(p.shape)
            if rank is not None:
                reason = f"subspace, rank {rank}"
            elif p.dim() != 2:
                reason = f"full space ({p.dim()}-d)"
            elif ranks and min(shape) < max(ranks):
                reason = f"full space (min(m, n) = {min(shape)} < rank {max(ranks)})"
            else:
                reason = "full space (not a targeted nn.Linear weight, or below min_dim)"
            out.append(Choice(name, shape, rank, reason))
    return out


def describe_param_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    """A printable table of :func:`param_group_choices`: name, shape, where it is trained and why."""
    choices = param_group_choices(groups)
    width = max((len(c.name) for c in choices), default=4)
    lines = [f"{'name':<{width}}  {'shape':<14} trained in"]
    lines += [f"{c.name:<{width}}  {str(c.shape):<14} {c.reason}" for c in choices]
    in_subspace = sum(math.prod(c.shape) for c in choices if c.rank is not None)
    total = sum(math.prod(c.shape) for c in choices)
    lines.append(f"{sum(c.rank is not None for c in choices)} of {len(choices)} parameters "
                 f"({in_subspace} of {total} numbers) in a subspace")
    return "\n".join(lines)
