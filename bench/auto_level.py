"""GoLore@auto's false-switch rate and power through the public API: the numbers of docs/when_to_switch.md §3.

    PYTHONPATH=. python bench/auto_level.py [--count 400] [--out bench/results/auto_level.json]

A fixed user basis P (``projection=`` a callable returning it), m = n = 64, r = 16, τ = 100, lr 0 so the true
gradient g is stationary, gradients g + E with E of i.i.d. N(0, 1) entries, ``switch_step="auto"``; the first
``Refresh.test`` of each of ``count`` parameters of one optimizer (each its own noise and probes), read with a
refresh hook. Grid: SNR = ‖g‖²/E‖E‖² in {2, 20, 250} × the part of g outside P of rank one or full rank (48
equal singular values) × κ = ‖Pᵀg‖²/‖g‖² in {r/m = 0.25 (the boundary), 0.30 (inside the null), 0.10 (where a
random basis is better: the power)}. Uses nothing but the public optimizer, so the same script measures any
version of the package (``PYTHONPATH=<other checkout>``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from golore_lab import SubspaceSGD
from golore_lab.projection import random_stiefel

M, N, R, GAP = 64, 64, 16, 100


def scene(kappa: float, structure: str, snr: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P (M, R), g (M, N)): ‖g‖² = snr · M · N, κ(P) = kappa; the part outside P of rank one or full rank."""
    gen = torch.Generator().manual_seed(seed)
    U, V = random_stiefel(M, M, gen, torch.float64), random_stiefel(N, N, gen, torch.float64)
    norm2 = snr * M * N
    inside = math.sqrt(kappa * norm2) * U[:, :1] @ V[:, :1].T
    k = M - R if structure == "full-rank" else 1
    outside = math.sqrt((1 - kappa) * norm2 / k) * U[:, R:R + k] @ V[:, 1:1 + k].T
    return U[:, :R].contiguous(), inside + outside


def first_tests(kappa: float, structure: str, snr: float, count: int, seed: int = 0) -> list:
    P, g = scene(kappa, structure, snr)
    params = [torch.nn.Parameter(torch.zeros(M, N, dtype=torch.float64)) for _ in range(count)]
    opt = SubspaceSGD(params, lr=0.0, rank=R, update_proj_gap=GAP, proj_type="left", switch_step="auto",
                      projection=lambda grad, rank, side, generator: P.clone(), seed=seed)
    tests = {}
    opt.register_refresh_hook(lambda _, e: tests.setdefault(e.position, e.test) if e.step == GAP else None)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(GAP + 1):
        for p, noise in zip(params, torch.randn(count, M, N, generator=gen, dtype=torch.float64)):
            p.grad = g + noise
        opt.step()
    return [tests[i] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kappa in (R / M, 0.30, 0.10):
        for structure in ("rank-one", "full-rank"):
            for snr in (2.0, 20.0, 250.0):
                start = time.perf_counter()
                tests = first_tests(kappa, structure, snr, args.count, seed=len(rows))
                rate = sum(t.switch for t in tests) / len(tests)
                rows.append({"kappa": kappa, "structure": structure, "snr": snr, "count": len(tests),
                             "switch_rate": rate, "se": math.sqrt(max(rate * (1 - rate), 0.05 * 0.95) / len(tests)),
                             "pairs": tests[0].pairs})
                print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
