"""How a subspace is chosen: the only thing in which GaLore, GoLore and large-batch GaLore differ.

A weight matrix W (m × n) is trained in a rank-r subspace of one of its two sides:

* ``side="left"``:  P ∈ St(m, r) = {P : PᵀP = I_r},  R = Pᵀ G  (r × n),  update  P N  (m × n);
* ``side="right"``: Q ∈ St(n, r),                     R = G Q   (m × r),  update  N Qᵀ (m × n).

A *projector* is any callable ``projector(grad, rank, side, generator) -> basis`` that returns an orthonormal
basis of shape (m, r) for ``side="left"`` or (n, r) for ``side="right"``. This is the whole protocol; a user's
own projector must follow it:

* ``grad`` is the (m, n) gradient at the refresh step (already the large-batch gradient for L.B. GaLore);
* ``generator`` is a CPU ``torch.Generator`` seeded for this parameter and this refresh; draw every random
  number from it (never from the global RNG), so runs are reproducible and identical on every DDP rank;
* the result must have orthonormal columns and may be of any floating dtype (the optimizer casts it to the
  parameter's dtype and device); a user's projector is checked at each refresh (:func:`check_basis`) and a
  bad result refused, naming the parameter;
* it must be a pure function of its arguments: the optimizer keeps no projector state, so that checkpoints hold
  tensors only.

Built in:

* :func:`svd_projection` (GaLore): top-r singular vectors of ``grad``, computed in float32 (float64 for
  float64 gradients) whatever the parameter's dtype;
* :func:`random_projection` (GoLore): Haar-uniform on the Stiefel manifold, :func:`random_stiefel`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Projector = Callable[[Tensor, int, str, torch.Generator], Tensor]

SIDES = ("left", "right")
PROJ_TYPES = ("std", "reverse_std", "left", "right")


def projected_side(shape: tuple[int, int], proj_type: str) -> str:
    """Which side of an (m, n) matrix is projected, with galore-torch's meaning of ``proj_type``.

    ``"std"`` projects the smaller side (right if m >= n, else left), ``"reverse_std"`` the larger one (left
    if m >= n, else right); ``"left"`` and ``"right"`` are fixed. Ties (m == n) count as m >= n.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r} (must be one of {', '.join(map(repr, PROJ_TYPES))})")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype projections are computed in: float64 for float64 tensors, float32 otherwise (bf16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd_projection(grad: Tensor, rank: int, side: str, generator: torch.Generator | None = None) -> Tensor:
    """GaLore's basis: the top-``rank`` left (m, r) or right (n, r) singular vectors of ``grad``.

    Also works on a batch of gradients (..., m, n).
    """
    matrix = grad.detach().to(compute_dtype(grad.dtype))
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)  # U (m, k), Vh (k, n), k = min(m, n)
    basis = U[..., :rank] if side == "left" else Vh[..., :rank, :].mT
    return basis.contiguous()  # a copy: a view would keep the whole U or Vh alive in the optimizer state


def random_stiefel(dim: int, rank: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-uniform point of St(dim, rank): an orthonormal (dim, rank) basis of a uniformly random subspace.

    Q from the thin QR of a (dim, rank) standard Gaussian Z = Q R, with the signs of diag(R) folded into Q so
    that the factorisation is unique; then Q is exactly Haar distributed. Costs O(dim r²) and never forms a
    dim × dim matrix. Drawn on the CPU from ``generator`` so that the same seed gives the same basis on any
    device.
    """
    z = torch.randn(dim, rank, generator=generator, dtype=compute_dtype(dtype))
    return haar_q(*torch.linalg.qr(z))  # q (dim, rank), r (rank, rank)


def haar_q(q: Tensor, r: Tensor) -> Tensor:
    """Q of a thin QR Z = Q R with the signs of diag(R) folded in (a zero counts as +), so that the factorisation
    is unique and Q of a Gaussian Z is Haar distributed. Batched: q (..., dim, r), r (..., r, r)."""
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    return q * signs.unsqueeze(-2)


def random_projection(grad: Tensor, rank: int, side: str, generator: torch.Generator) -> Tensor:
    """GoLore's basis: uniformly random, independent of ``grad`` (only its shape is used)."""
    dim = grad.shape[0] if side == "left" else grad.shape[1]
    return random_stiefel(dim, rank, generator, grad.dtype)


BUILTIN: dict[str, Projector] = {"svd": svd_projection, "random": random_projection}


def resolve(projection: str | Projector) -> Projector:
    """Map ``"svd"`` / ``"random"`` to the built-in projector; pass a callable through."""
    if callable(projection):
        return projection
    if projection in BUILTIN:
        return BUILTIN[projection]
    raise ValueError(f"Invalid projection: {projection!r} (must be 'svd', 'random' or a callable projector)")


def check_basis(basis: object, dim: int, rank: int) -> None:
    """Refuse a projector's result unless it is a floating (dim, rank) tensor with orthonormal columns.

    Orthonormal up to rounding: max |PᵀP − I| <= 10·eps·dim in the basis's dtype -- the loss of orthogonality
    of a Householder QR grows like eps·dim -- computed in float32 or float64. Costs one (r × dim)(dim × r)
    product and one device sync, so callers check a user's projector only, at refresh steps. The
    ``ValueError`` says what was returned ("returned ..."); callers prefix the projector and parameter.
    """
    if not (isinstance(basis, Tensor) and basis.is_floating_point() and tuple(basis.shape) == (dim, rank)):
        got = f"shape {tuple(basis.shape)}, {basis.dtype}" if isinstance(basis, Tensor) else type(basis).__name__
        raise ValueError(f"returned {got}; a basis must be a floating ({dim}, {rank}) tensor")
    q = basis.detach().to(compute_dtype(basis.dtype))
    error = float((q.T @ q - torch.eye(rank, dtype=q.dtype, device=q.device)).abs().max())
    tolerance = 10 * torch.finfo(basis.dtype).eps * dim
    if not error <= tolerance:
        raise ValueError(f"returned a basis without orthonormal columns: max |PᵀP − I| = {error:.3g} > "
                         f"{tolerance:.3g}")


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, index: int, step: int) -> int:
    """A 63-bit seed for parameter ``index`` at refresh ``step`` of an optimizer seeded with ``seed``.

    Counter-based: the random basis of any refresh is a pure function of (seed, index, step), so it needs no
    saved generator state, survives checkpoint/resume exactly, and is the same on every DDP rank without
    communication (all ranks build the optimizer over the same parameters in the same order).
    """
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (index & _MASK64))
    x = _splitmix64(x ^ (step & _MASK64))
    return x >> 1


def refresh_generator(seed: int, index: int, step: int) -> torch.Generator:
    """The CPU generator a projector receives for parameter ``index`` at refresh ``step``."""
    return torch.Generator().manual_seed(derive_seed(seed, index, step))


def transport(side: str, old: Tensor, new: Tensor) -> Tensor:
    """The r × r matrix that carries subspace coordinates from basis ``old`` to basis ``new``.

    Left: a state M (r × n) in the old basis becomes O M with O = P_newᵀ P_old.
    Right: a state M (m × r) becomes M O with O = Q_oldᵀ Q_new.
    """
    return new.T @ old if side == "left" else old.T @ new
