"""The batched (``foreach``) path: several matrices of one shape and side projected, refreshed and updated at once.

As ``torch.optim``'s ``foreach`` path groups tensors to replace a Python loop of small kernels by a few large
ones, a param group with ``foreach=True`` (the default on CUDA) stacks its matrices of equal shape, projected
side, dtype and step count -- e.g. the 4 attention and 3 MLP shapes of a LLaMA give 3 buckets of
``n_layers`` × (4, 2, 1) matrices -- and takes each part of the step as one batched call:

===============  ==================================================================  ============================
refresh          SVD: ``torch.linalg.svd`` of the (B, m, n) stack; random: B draws     (B, m, r) or (B, n, r)
                 from the B per-parameter generators, one batched QR
projection       R = Pᵀ G or G Q, one ``bmm``                                          (B, r, n) or (B, m, r)
rule             torch's fused AdamW kernel over the B state tensors (``torch._foreach_*``
                 where it cannot take them, and for SGD)
update           W += α P N or α N Qᵀ, one ``bmm``, then one ``_foreach_add_``          (B, m, n)
===============  ==================================================================  ============================

Every function returns what the per-tensor path (:mod:`golore_lab.projection`, :mod:`golore_lab.rules`)
returns for each matrix, in the same order; batched LAPACK and BLAS calls loop over the same per-matrix
kernels on the CPU, so the two paths agree to rounding (``tests/test_batched.py``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from . import projection as proj

FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())  # device types with torch's fused optimizer kernels


def svd_bases(grads: list[Tensor], rank: int, side: str) -> list[Tensor]:
    """GaLore's bases of B gradients (m, n) from one batched SVD: B tensors (m, r) or (n, r)."""
    return list(proj.svd_projection(torch.stack(grads), rank, side).unbind(0))


def random_bases(shape: tuple[int, int], rank: int, side: str, generators: list[torch.Generator],
                 dtype: torch.dtype) -> list[Tensor]:
    """GoLore's bases: B Gaussians (dim, r), each from its own generator (as :func:`random_stiefel` draws them),
    orthonormalized by one batched QR with the signs of diag(R) folded in. B tensors (dim, r)."""
    dim = shape[0] if side == "left" else shape[1]
    z = torch.stack([torch.randn(dim, rank, generator=g, dtype=proj.compute_dtype(dtype)) for g in generators])
    return list(proj.haar_q(*torch.linalg.qr(z)).unbind(0))  # (B, dim, r) from the (B, dim, r), (B, r, r) QR


def project(grads: list[Tensor], bases: list[Tensor], side: str) -> list[Tensor]:
    """R = Pᵀ G (r, n) or G Q (m, r) for B matrices in one ``bmm``."""
    g, b = torch.stack(grads), torch.stack(bases)
    return list((b.mT @ g if side == "left" else g @ b).unbind(0))


def transports(side: str, olds: list[Tensor], news: list[Tensor]) -> list[Tensor]:
    """The B r × r transport matrices of :func:`golore_lab.projection.transport` in one ``bmm``."""
    old, new = torch.stack(olds), torch.stack(news)
    return list((new.mT @ old if side == "left" else old.mT @ new).unbind(0))


def adamw_directions(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], count: int,
                     beta1: float, beta2: float, eps: float) -> tuple[list[Tensor], float]:
    """:func:`golore_lab.rules.adamw_direction` over B tensors with ``foreach`` kernels.

    Returns the quotients m / (√v / √(1−β₂^k) + ε) (new tensors) and the factor 1/(1−β₁^k); the moments are
    updated in place.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, math.sqrt(1 - beta2**count))
    torch._foreach_add_(denoms, eps)
    return torch._foreach_div(exp_avgs, denoms), 1 / (1 - beta1**count)


def fusable(*tensors: Tensor) -> bool:
    """Whether torch's fused AdamW kernel can take these tensors (a parameter, its gradient and moments): one
    device type that has the kernel, one floating dtype, all contiguous -- the CPU kernel walks each tensor's
    memory in order, so a transposed parameter with a contiguous gradient would pair the wrong elements."""
    first = tensors[0]
    return (first.device.type in FUSED_DEVICES and torch.is_floating_point(first)
            and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors))


def fused_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 counts: list[int], lr: float | Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """One AdamW step of B tensors in torch's fused kernel, the one ``torch.optim.AdamW(fused=True)`` calls::

        W ← (1 − lr·wd) W;  m ← β₁ m + (1−β₁) g;  v ← β₂ v + (1−β₂) g²;
        W ← W − lr/(1−β₁^k) · m / (√v / √(1−β₂^k) + ε)

    with k = ``counts[i]`` for tensor i (the bias correction; it may differ between tensors), all in place.
    The tensors must pass :func:`fusable` and share one device and dtype. A tensor ``lr`` on another device than
    the tensors is moved as torch.optim.Adam moves it (a CPU one is read by the kernel as it is).
    """
    device = params[0].device
    steps: dict[int, Tensor] = {}  # the kernel reads one float32 count per tensor; equal counts share one
    for count in counts:
        if count not in steps:
            steps[count] = torch.full((), count, dtype=torch.float32, device=device)
    if torch.is_tensor(lr) and lr.device.type != "cpu" and lr.device != device:
        lr = lr.to(device)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [steps[count] for count in counts], amsgrad=False,
                        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
                        grad_scale=None, found_inf=None)


def fused_adamw_directions(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], count: int,
                           beta1: float, beta2: float, eps: float) -> list[Tensor]:
    """:func:`adamw_directions` in torch's fused kernel: the directions N = m / (√v / √(1−β₂^k) + ε) / (1−β₁^k),
    bias correction included (new tensors), the moments updated in place.

    The kernel updates a parameter; applied to a zero "parameter" with lr = −1 and no decay, it leaves exactly N
    there: one pass over each r-sized tensor instead of seven element-wise kernels.
    """
    directions = [torch.zeros_like(grad) for grad in grads]
    fused_adamw_(directions, grads, exp_avgs, exp_avg_sqs, [count] * len(grads), -1.0, beta1, beta2, eps, 0.0)
    return directions


def add_back_projection(weights: list[Tensor], bases: list[Tensor], directions: list[Tensor], side: str,
                        alpha: float) -> None:
    """W_i += α P_i N_i (left) or α N_i Q_iᵀ (right) for B matrices: one ``bmm`` and one ``_foreach_add_``."""
    b, d = torch.stack(bases), torch.stack(directions)
    updates = b @ d if side == "left" else d @ b.mT  # (B, m, n)
    torch._foreach_add_(weights, list(updates.unbind(0)), alpha=alpha)
