"""The one basis builder: which projector a refresh uses (:func:`refresh_kind`) and the new bases of a bucket of
parameters (:func:`new_bases`), on the per-tensor and the batched path alike, a user's projector checked on both."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import batched
from .. import projection as proj
from .. import spec
from .records import Target


def refresh_kind(group: dict[str, Any], count: int, random: bool = False) -> str:
    """``"random"`` at and after the switch (``random``: GoLore@auto switched), else ``"svd"`` or ``"custom"``."""
    switch = group["switch_step"]
    if random or (spec.is_int(switch) and count >= switch):
        return "random"
    return group["projection"] if isinstance(group["projection"], str) else "custom"


def check_basis(basis: Any, group: dict[str, Any], matrix: Tensor, side: str, name: str) -> None:
    """A user's projector returned a floating (dim, r) basis with orthonormal columns, else ``ValueError``."""
    dim = matrix.shape[0] if side == "left" else matrix.shape[1]
    try:
        proj.check_basis(basis, dim, group["rank"])
    except ValueError as error:
        raise ValueError(f"The projector {spec.describe_setting(group['projection'])} for parameter {name} "
                         f"({side} side, rank {group['rank']}) {error}") from None


def new_bases(targets: list[Target], kind: str, stacked: bool, check_finite: Callable[[list, list], None],
              gram: Tensor | None = None) -> list[Tensor]:
    """The refreshed bases of ``targets`` (one group, side and step; several only when ``stacked``), identical on
    every rank, in the parameters' device and dtype.

    ``stacked``: one batched SVD or QR (:mod:`golore_lab.batched`); else one projector call per parameter, whose
    input is what the parameter's operations give (a sharded matrix's random basis needs only its shape, its SVD
    basis comes from the all-reduced Gram matrix, right side, ``gram`` when GoLore@auto already all-reduced it, or
    from the all-gathered gradient). The gradients are checked finite before an SVD or a user's projector sees
    them (``check_finite(tensors, names)``), and a user's projector's result is checked.
    """
    first = targets[0]
    group, side, rank = first.group, first.side, first.group["rank"]
    generators = [proj.refresh_generator(group["seed"], t.position, first.count) for t in targets]
    if stacked and kind == "random":
        raw = batched.random_bases(tuple(first.weight.shape), rank, side, generators, first.weight.dtype)
    elif stacked and kind == "svd":
        check_finite([t.grad for t in targets], [t.name for t in targets])
        raw = batched.svd_bases([t.grad for t in targets], rank, side)
    else:
        raw = [_one(t, kind, side, rank, generator, check_finite, gram) for t, generator in zip(targets, generators)]
    return [t.ops.place(basis, t.grad.device).to(t.weight.dtype) for t, basis in zip(targets, raw)]


def _one(target: Target, kind: str, side: str, rank: int, generator: torch.Generator,
         check_finite: Callable[[list, list], None], gram: Tensor | None) -> Tensor:
    special = target.ops.special_basis(kind, target.grad, side, rank, gram, target.name)
    if special is not None:
        return special
    matrix = target.ops.projector_input(kind, target.grad)  # (m, n)
    if kind != "random":
        check_finite([matrix], [target.name])
    projector = proj.resolve(target.group["projection"]) if kind == "custom" else proj.BUILTIN[kind]
    basis = projector(matrix, rank, side, generator)
    if kind == "custom":
        check_basis(basis, target.group, matrix, side, target.name)
    return basis
