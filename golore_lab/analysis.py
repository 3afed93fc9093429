"""How much of the true gradient does a subspace capture? Metrics, a refresh tracker, and the sweeps of Figure 2.

Notation: G is the true (full-batch) gradient (m × n), Ĝ = G + E a stochastic one, P an orthonormal basis of
the projected side: (m, r) with ``side="left"`` (the subspace acts as PᵀG) or (n, r) with ``side="right"``
(G P). All metrics are pure functions of tensors and accept leading batch dimensions.

* captured fraction  κ(P, G) = ‖PᵀG‖²_F / ‖G‖²_F ∈ [0, 1]: 1 when the subspace holds the whole gradient;
  r/m in expectation for a Haar-random P, whatever G is; 0 when P sees none of it (GaLore's stall);
* principal angles between span(P) and the top-r singular subspace of G (0 when they coincide);
* signal-to-noise ratio ‖G‖₂ / s, the spectral norm of the true gradient over the noise scale s (the SVD of
  Ĝ finds G's directions roughly while they stand above the noise);
* noise share ‖Pᵀ(Ĝ − G)‖² / ‖PᵀĜ‖²: how much of what the optimizer actually sees in the subspace is noise.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import pandas as pd
import torch
from torch import Tensor

from . import projection as proj
from .optim import Refresh, SubspaceOptimizer
from .threads import num_threads


def _project(basis: Tensor, G: Tensor, side: str) -> Tensor:
    if side == "left":
        return basis.mT @ G
    if side == "right":
        return G @ basis
    raise ValueError(f"Invalid side: {side!r} (must be 'left' or 'right')")


def captured_fraction(basis: Tensor, G: Tensor, side: str = "left") -> Tensor:
    """κ = ‖PᵀG‖²_F / ‖G‖²_F (left) or ‖G P‖²_F / ‖G‖²_F (right); NaN where G = 0."""
    G = G.to(basis.dtype)
    return _project(basis, G, side).square().sum((-2, -1)) / G.square().sum((-2, -1))


def top_subspace(G: Tensor, rank: int, side: str = "left") -> Tensor:
    """The top-``rank`` singular subspace of G on ``side`` (what GaLore would pick from an exact gradient)."""
    return proj.svd_projection(G, rank, side)


def principal_angles(basis: Tensor, G: Tensor, rank: int | None = None, side: str = "left") -> Tensor:
    """Principal angles (radians, ascending) between span(``basis``) and the top-``rank`` subspace of G.

    The cosines are the singular values of Pᵀ U_r; ``rank`` defaults to the basis' own rank.
    """
    rank = basis.shape[-1] if rank is None else rank
    target = top_subspace(G, rank, side).to(basis.dtype)
    cosines = torch.linalg.svdvals(basis.mT @ target).clamp(-1.0, 1.0)
    return torch.arccos(cosines)  # svdvals are descending, so the angles ascend


def signal_to_noise(G: Tensor, noise_scale: float) -> Tensor:
    """‖G‖₂ / ``noise_scale``: the spectral norm of the true gradient in units of the noise."""
    if noise_scale <= 0:
        raise ValueError(f"Invalid noise_scale: {noise_scale!r} (must be > 0)")
    return torch.linalg.matrix_norm(G, ord=2) / noise_scale


def noise_share(basis: Tensor, G: Tensor, G_stochastic: Tensor, side: str = "left") -> Tensor:
    """‖Pᵀ(Ĝ − G)‖² / ‖PᵀĜ‖²: the share of the stochastic gradient's energy inside P that is noise."""
    seen = _project(basis, G_stochastic.to(basis.dtype), side).square().sum((-2, -1))
    noise = _project(basis, (G_stochastic - G).to(basis.dtype), side).square().sum((-2, -1))
    return noise / seen


class ProjectionTracker:
    """Record, during any training run, metrics of the basis each refresh actually chose.

    ``metrics`` maps a column name to ``fn(refresh) -> float`` (see :class:`golore_lab.optim.Refresh`); by
    default only the step, parameter and kind are recorded. Nothing else is stored, unless ``keep_bases`` is
    True (then :attr:`bases` holds clones). Use as a context manager or call :meth:`remove`::

        tracker = ProjectionTracker(opt, {"captured": lambda r: captured_fraction(r.basis, true_grad[r.param], r.side)})
        ... train ...
        tracker.frame()   # one row per parameter per refresh
    """

    def __init__(self, optimizer: SubspaceOptimizer, metrics: dict[str, Callable[[Refresh], float]] | None = None,
                 keep_bases: bool = False) -> None:
        self.metrics = dict(metrics or {})
        self.keep_bases = keep_bases
        self.rows: list[dict] = []
        self.bases: list[Tensor] = []
        self._handle = optimizer.register_refresh_hook(self._record)

    def _record(self, optimizer: SubspaceOptimizer, refresh: Refresh) -> None:
        row = {"step": refresh.step, "position": refresh.position, "name": refresh.name, "side": refresh.side,
               "kind": refresh.kind, "rank": refresh.basis.shape[-1]}
        row.update({name: float(fn(refresh)) for name, fn in self.metrics.items()})
        self.rows.append(row)
        if self.keep_bases:
            self.bases.append(refresh.basis.detach().clone())

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "ProjectionTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ------------------------------------------------------------------------------------- the SNR sweep
def snr_sweep(G: Tensor, noise: Tensor, rank: int, snrs: Iterable[float], batches: Iterable[int] = (1,),
              trials: int = 200, seed: int = 0, noise_scale: float = 1.0) -> pd.DataFrame:
    """Captured fraction of a true gradient against its signal-to-noise ratio, for SVD and random subspaces.

    G is rescaled so that ‖G‖₂ / ``noise_scale`` equals each SNR; the stochastic gradient is
    G + ξ̄ · ``noise`` with ξ̄ the mean of B independent signs (the counterexample's oracle), for each batch
    size B. ``method`` is ``svd (B=...)`` for the top-``rank`` SVD of that stochastic gradient, ``random`` for a
    Haar-random basis (independent of both). Returns one row per (method, snr) with the mean and the standard
    error over ``trials``.
    """
    with num_threads(1):
        return _snr_sweep(G, noise, rank, snrs, batches, trials, seed, noise_scale)


def _snr_sweep(G, noise, rank, snrs, batches, trials, seed, noise_scale) -> pd.DataFrame:
    generator = torch.Generator().manual_seed(seed)
    G = G.double() / torch.linalg.matrix_norm(G.double(), ord=2) * noise_scale
    noise = noise.double()
    rows = []
    for snr in snrs:
        signal = snr * G
        for batch in batches:
            signs = torch.randint(0, 2, (trials, batch), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
            stochastic = signal + signs.mean(1)[:, None, None] * noise
            kappa = captured_fraction(proj.svd_projection(stochastic, rank, "left"), signal.expand_as(stochastic))
            rows.append(_summary(f"svd (B={batch})", batch, snr, kappa))
        bases = torch.stack([proj.random_stiefel(G.shape[0], rank, generator, torch.float64) for _ in range(trials)])
        rows.append(_summary("random", 0, snr, captured_fraction(bases, signal.expand(trials, *signal.shape))))
    return pd.DataFrame(rows)


def _summary(method: str, batch: int, snr: float, kappa: Tensor) -> dict:
    return {"method": method, "batch": batch, "snr": snr, "captured": kappa.mean().item(),
            "stderr": kappa.std().item() / math.sqrt(len(kappa))}


def snr_threshold(sweep: pd.DataFrame, level: float = 0.5) -> pd.Series:
    """Per SVD method, the smallest swept SNR at which the mean captured fraction reaches ``level``."""
    svd = sweep[sweep.method.str.startswith("svd")]
    return svd[svd.captured >= level].groupby("batch").snr.min()


# ------------------------------------------------------------------------------------- real models
def layer_gradients(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, object], Tensor], batch,
                    names: list[str]) -> dict[str, Tensor]:
    """Gradients of ``loss_fn(model, batch)`` for the named parameters; the model's own ``.grad`` is restored.

    ``batch`` may be a list of equal-size chunks: the gradient is then the mean over the chunks (the gradient
    of the whole batch, without holding its graph in memory at once).
    """
    params = dict(model.named_parameters())
    saved = {name: p.grad for name, p in params.items()}
    chunks = batch if isinstance(batch, list) else [batch]
    model.zero_grad(set_to_none=True)
    for chunk in chunks:
        (loss_fn(model, chunk) / len(chunks)).backward()
    grads = {name: params[name].grad.detach().clone() for name in names}
    for name, p in params.items():
        p.grad = saved[name]
    return grads


def layer_capture(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, object], Tensor], names: list[str],
                  reference_batch, small_batch, large_batch, rank: int, generator: torch.Generator,
                  proj_type: str = "std") -> pd.DataFrame:
    """Per layer: how much of the true gradient each subspace captures, at the model's current weights.

    G is the gradient of ``reference_batch`` (a fixed evaluation set: the "true" gradient), Ĝ₁ that of
    ``small_batch`` (one optimizer batch), Ĝ_B that of ``large_batch`` (B times larger). Columns: the captured
    fraction κ of G by the top-``rank`` SVD of Ĝ₁ (``svd``), of Ĝ_B (``svd_large``), by a Haar-random basis
    (``random``) and by the top-``rank`` SVD of G itself (``oracle``, the best any rank-r subspace can do);
    ``snr`` = ‖G‖₂ / ‖Ĝ₁ − G‖₂, the layer's gradient-to-noise ratio (spectral norms).
    """
    true = layer_gradients(model, loss_fn, reference_batch, names)
    small = layer_gradients(model, loss_fn, small_batch, names)
    large = layer_gradients(model, loss_fn, large_batch, names)
    rows = []
    for name in names:
        G = true[name].double()
        side = proj.projected_side(tuple(G.shape), proj_type)
        dim = G.shape[0] if side == "left" else G.shape[1]
        bases = {"svd": proj.svd_projection(small[name].double(), rank, side),
                 "svd_large": proj.svd_projection(large[name].double(), rank, side),
                 "random": proj.random_stiefel(dim, rank, generator, torch.float64),
                 "oracle": proj.svd_projection(G, rank, side)}
        row = {"layer": name, "side": side, "rank": rank, "dim": dim}
        row.update({key: captured_fraction(basis, G, side).item() for key, basis in bases.items()})
        row["snr"] = (torch.linalg.matrix_norm(G, ord=2) / torch.linalg.matrix_norm(small[name].double() - G, ord=2)
                      ).item()
        rows.append(row)
    return pd.DataFrame(rows)
