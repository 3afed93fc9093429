"""Subspace optimizers under FSDP2 (``torch.distributed.fsdp.fully_shard``): the sharded-matrix mathematics.

FSDP2 stores each parameter as a DTensor sharded by rows (placement ``Shard(0)``): rank k holds the rows
W_k (m_k × n) of W (m × n) and, after backward, the rows G_k of the averaged gradient G. The optimizer works on
the local rows only:

* **Right projection (the default for a sharded matrix).** The projected side is the unsharded one:
  R_k = G_k Q (m_k × r) with Q ∈ St(n, r) replicated, and the update W_k ← W_k − lr·scale·N_k Qᵀ is local. The
  state (``exp_avg``, ...) is (m × r) sharded by rows exactly like the parameter, so each rank keeps 1/world
  of the moments; the basis Q (n × r) is replicated.
* **GoLore's basis needs no communication**: Q is a pure function of (seed, parameter position, step)
  (:func:`golore_lab.projection.derive_seed`), so every rank draws the same Q.
* **GaLore's basis** is the top-r right singular vectors of G, which are the top-r eigenvectors of the n × n
  Gram matrix GᵀG = Σ_k G_kᵀ G_k: one all-reduce of n² numbers per matrix at a refresh step
  (:func:`gram_right_basis`). Numerical caveat: the Gram matrix squares the singular values, hence the
  condition number; the eigenvectors of σ_i² are as accurate as the SVD's σ_i only when the gap σ_r² − σ_{r+1}²
  is well above ε·σ_1². The Gram matrix and its eigendecomposition are therefore computed in float64 (error
  ~1e-16·σ_1²), whatever the parameter's dtype; the basis agrees with the one-process SVD up to the sign of
  each vector, to which the optimizer's update is invariant.
* **Left projection of a sharded matrix** (``proj_type="left"``, or ``"reverse_std"``) works too, at a cost: the
  projected gradient R = Pᵀ G = Σ_k P_kᵀ G_k is all-reduced (r × n numbers) at every step, the state (r × n) is
  replicated, and an SVD refresh all-gathers G (m × n).
* **Non-finite gradients** are detected globally: the per-parameter squared norms of the local projected
  gradients are summed over the ranks in one all-reduce per step, so every rank raises the same
  ``FloatingPointError`` (or none) and no rank steps or hangs alone.

* **GoLore@auto** (``switch_step="auto"``) adds no collective to the step: on the right side each rank's share of
  the period's pair products (a (J, 2) tensor) is summed in the same all-reduce as the Gram matrix at an SVD
  refresh (:func:`gram_matrix`'s ``extra``); on the left side the probe's view Σ_k Π_kᵀ G_k rides in the per-step
  all-reduce of R. Its checkpoint layout and the one all-reduce ``state_dict()`` then issues are in
  ``docs/when_to_switch.md`` ("Sharded parameters").

Every rank takes the same decisions (refresh steps, SVD or random, GoLore@auto's switches) from its step
counters and from numbers summed over the ranks, which are equal on all ranks, so nothing else is communicated.

To train a model with FSDP2, shard it with :func:`shard_model` and build the optimizer over its parameters.

The optimizer reaches all of this through one object per parameter (:func:`ops`): :data:`LOCAL` for a plain
tensor, a :class:`RowShards` for a row-sharded DTensor, with the same methods (the side, the projection, the rows
of the basis a rank updates, the input of a projector, the layout of a new basis, the state's layout), so the
optimizer's mathematics is written once, without a branch on sharding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import projection as proj

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without DTensor: every parameter is a plain tensor
    DTensor = Replicate = Shard = None

__all__ = ["Sharding", "RowShards", "Local", "LOCAL", "ops", "sharding", "shard_model", "gram_right_basis",
           "gram_matrix", "right_basis", "all_reduce_sum"]


@dataclass(frozen=True)
class Sharding:
    """How a row-sharded (``Shard(0)``) parameter of global ``shape`` is laid out: this rank holds rows
    ``[offset, offset + rows)``."""

    mesh: object
    shape: tuple[int, ...]
    offset: int
    rows: int

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def world(self) -> int:
        return self.mesh.size()

    def wrap(self, local: Tensor) -> Tensor:
        """A local (rows, ...) tensor as the row-sharded DTensor of global shape (shape[0], ...)."""
        shape = (self.shape[0], *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


class Local:
    """The one-process operations of a plain (unsharded) parameter; see :class:`RowShards` for the sharded ones."""

    shard = None   # what GoLore@auto's steps take: the Sharding, or None
    group = None   # the process group of the collectives: none

    @staticmethod
    def side(shape: tuple[int, int], proj_type: str) -> str:
        return proj.projected_side(shape, proj_type)

    @staticmethod
    def project(grad: Tensor, basis: Tensor, side: str, probe: Tensor | None = None) -> tuple[Tensor, None]:
        """R = Pᵀ G (r, n) or G Q (m, r); no probe view (GoLore@auto computes its own)."""
        return (grad @ basis if side == "right" else basis.T @ grad), None

    @staticmethod
    def local_rows(basis: Tensor) -> Tensor:
        """The rows of a left basis (m, r) this process updates: all."""
        return basis

    @staticmethod
    def wrap(local: Tensor) -> Tensor:
        return local

    @staticmethod
    def store(value: Any, old: Any, side: str | None) -> Any:
        """A state tensor as the optimizer keeps it."""
        return value

    @staticmethod
    def special_basis(kind: str, grad: Tensor, side: str, rank: int, gram: Tensor | None, name: str) -> None:
        """A basis that takes another way than a projector (:class:`RowShards`: the right SVD basis); none."""
        return None

    @staticmethod
    def projector_input(kind: str, grad: Tensor) -> Tensor:
        """The (m, n) matrix a projector is called with: the gradient."""
        return grad

    @staticmethod
    def place(basis: Tensor, device: torch.device) -> Tensor:
        return basis.to(device)


LOCAL = Local()


@dataclass(frozen=True)
class RowShards(Sharding):
    """The operations of a row-sharded (``Shard(0)``) parameter: what :class:`Local` does, on this rank's rows."""

    @property
    def shard(self) -> "RowShards":
        return self

    @staticmethod
    def side(shape: tuple[int, int], proj_type: str) -> str:
        return sharded_side(proj_type)

    def project(self, grad: Tensor, basis: Tensor, side: str,
                probe: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """R = G_k Q (local rows, right side) or Pᵀ G = Σ_k P_kᵀ G_k (left side: one all-reduce per step).

        GoLore@auto on the left side: with ``probe`` Π (m, q), the same all-reduce carries ΠᵀG = Σ_k Π_kᵀ G_k
        ((r + q) × n numbers instead of r × n), returned as the second value.
        """
        if side == "right":
            return grad @ basis, None  # (m_k, r): local rows of G Q
        rows = slice(self.offset, self.offset + self.rows)
        if probe is None:
            return all_reduce_sum(basis[rows].T @ grad, self.group), None  # (r, n), one collective per step
        both = all_reduce_sum(torch.cat([basis[rows], probe[rows]], 1).T @ grad, self.group)
        rank = basis.shape[1]
        return both[:rank], both[rank:]  # (r, n), (q, n)

    def local_rows(self, basis: Tensor) -> Tensor:
        """This rank's rows [offset, offset + rows) of a left basis (m, r)."""
        return basis[self.offset:self.offset + self.rows]

    def store(self, value: Any, old: Any, side: str | None) -> Any:
        """Row-sharded moments (right side, full space) become DTensors again (a new one only for new storage)."""
        if side == "left" or not torch.is_tensor(value):
            return value
        if old is None or local(old).data_ptr() != value.data_ptr():
            return self.wrap(value)
        return old

    def special_basis(self, kind: str, grad: Tensor, side: str, rank: int, gram: Tensor | None,
                      name: str) -> Tensor | None:
        """GaLore's right basis from the all-reduced Gram matrix (``gram``: already all-reduced by GoLore@auto)."""
        if kind != "svd" or side != "right":
            return None
        try:
            if gram is None:
                gram = gram_matrix(grad, self.group)[0]
            return right_basis(gram, rank).to(grad.device)
        except FloatingPointError:
            raise FloatingPointError(f"Non-finite gradient in parameter {name}; step skipped, no parameter "
                                     "or optimizer state was changed") from None

    def projector_input(self, kind: str, grad: Tensor) -> Tensor:
        """A random basis needs only the shape (a meta tensor); any other the full gradient (one all-gather)."""
        if kind == "random":
            return torch.empty(self.shape, dtype=grad.dtype, device="meta")
        return self.wrap(grad).full_tensor()  # (m, n): one all-gather at this refresh

    @staticmethod
    def place(basis: Tensor, device: torch.device) -> Tensor:
        # as a DCP checkpoint stores it: a resumed step multiplies with the same layout
        return basis.to(device).contiguous()  # (a QR's Q is column-major; BLAS rounds by layout)


def ops(param: Tensor, name: str) -> Local | RowShards:
    """The operations of ``param``: its :class:`RowShards` when it is a row-sharded DTensor, else :data:`LOCAL`."""
    return sharding(param, name) or LOCAL


def sharding(param: Tensor, name: str) -> RowShards | None:
    """The row sharding of ``param`` (a DTensor on a 1-D mesh with placement ``Shard(0)``), or None for a
    plain tensor. Any other placement is a ``ValueError`` naming it and the parameter ``name``."""
    if DTensor is None or not isinstance(param, DTensor):
        return None
    placements = tuple(param.placements)
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"Parameter {name} is a DTensor with placements {placements}: subspace optimizers support "
                         "FSDP2's row sharding (Shard(0)) on a 1-D mesh only")
    shape = tuple(param.shape)
    rows = param.to_local().shape[0]
    chunk = -(-shape[0] // param.device_mesh.size())  # torch.chunk's split, which FSDP2 uses
    offset = min(chunk * param.device_mesh.get_local_rank(), shape[0])
    return RowShards(param.device_mesh, shape, offset, rows)


def sharded_side(proj_type: str) -> str:
    """The projected side of a row-sharded matrix: the unsharded one (``"right"``) for ``"std"``, the sharded one
    for ``"reverse_std"``; ``"left"`` and ``"right"`` as given."""
    return {"std": "right", "reverse_std": "left"}.get(proj_type, proj_type)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def all_reduce_sum(tensor: Tensor, group) -> Tensor:
    """Sum ``tensor`` over ``group`` in place (one collective) and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gram_matrix(grad_rows: Tensor, group, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """GᵀG = Σ_k G_kᵀ G_k (n, n), in float64, from the row blocks G_k held by the ranks of ``group``: ONE
    all-reduce, which also sums ``extra`` (any shape: numbers each rank holds a share of, e.g. GoLore@auto's
    pair products) over the ranks; returns ``(gram, extra summed in float64)`` (None for no ``extra``)."""
    rows = grad_rows.detach().to(torch.float64)
    gram = rows.mT @ rows  # (n, n)
    if extra is None:
        return all_reduce_sum(gram, group), None
    flat = all_reduce_sum(torch.cat([gram.reshape(-1), extra.detach().to(torch.float64).reshape(-1)]), group)
    return flat[:gram.numel()].view(gram.shape), flat[gram.numel():].view(extra.shape)


def right_basis(gram: Tensor, rank: int) -> Tensor:
    """The top-``rank`` right singular vectors (n, r) of G from its Gram matrix GᵀG (n, n): the eigenvectors of its
    ``rank`` largest eigenvalues, largest first as the SVD's (equal up to sign). Raises ``FloatingPointError``
    when the Gram matrix is not finite (summed over the ranks, so on every rank alike)."""
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError("non-finite Gram matrix")
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, -rank:].flip(-1).contiguous()


def gram_right_basis(grad_rows: Tensor, rank: int, group) -> Tensor:
    """The top-``rank`` right singular vectors (n, r) of G, from the row blocks G_k held by the ranks of ``group``.

    GᵀG = Σ_k G_kᵀ G_k (n × n) is formed in float64 and summed in one all-reduce (:func:`gram_matrix`); its
    eigenvectors of the ``rank`` largest eigenvalues are the right singular vectors of G (up to sign)
    (:func:`right_basis`). Same result on every rank. Raises ``FloatingPointError`` (on every rank alike) when
    the summed Gram matrix is not finite.
    """
    return right_basis(gram_matrix(grad_rows, group)[0], rank)


def shard_model(model: nn.Module, blocks: str = "layers", **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to each module of ``model.<blocks>`` (a ModuleList; ``blocks`` may be a dotted
    path, e.g. ``"encoder.encoder.layer"``), then to the root.

    The usual FSDP2 layout: one all-gather per block in the forward and one reduce-scatter per block in the
    backward. Every parameter becomes a row-sharded DTensor, which :class:`golore_lab.SubspaceAdamW` and
    :class:`golore_lab.SubspaceSGD` train with local row blocks. Returns ``model`` (sharded in place).
    """
    from torch.distributed.fsdp import fully_shard

    try:
        children = model.get_submodule(blocks)
    except AttributeError:
        children = None
    if not isinstance(children, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}.{blocks} is not an nn.ModuleList of blocks to shard")
    for block in children:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
