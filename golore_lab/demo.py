"""``python -m golore_lab demo``: train one small model with each algorithm and print the results.

A two-layer MLP regresses a fixed random teacher from noisy mini-batches; its two weight matrices are trained
in a rank-4 subspace (refresh every 25 steps), the biases in the full space. Every method sees the same
initialisation and the same batches.
"""
from __future__ import annotations

import argparse

import torch

from . import SubspaceAdamW, SubspaceSGD, methods, microbatches

#: the methods compared (names as everywhere in the package, :mod:`golore_lab.methods`)
METHODS = ("full", "galore", "golore@100", "golore@20", "golore@auto", "lb-galore")
LARGE_BATCH = 16  # L.B. GaLore's micro-batches at refresh steps


def train(method: str, optimizer: str = "adamw", steps: int = 400, seed: int = 0) -> float:
    """Train the demo model with one method; return the final full-batch loss."""
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 64, generator=g) / 8, torch.randn(8, 32, generator=g) / 6]
    inputs = torch.randn(4096, 64, generator=g)
    targets = torch.tanh(inputs @ teacher[0].T) @ teacher[1].T
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    parsed = methods.parse(method)
    keywords = {"switch_step": parsed.switch_step(steps)}
    refresh_batches = LARGE_BATCH if parsed.large_batch else 1
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": matrices}, {"params": vectors}]
    if parsed.subspace:
        groups[0].update(rank=4, update_proj_gap=25)
    if optimizer == "adamw":
        opt = SubspaceAdamW(groups, lr=3e-3, seed=seed, **keywords)
    else:
        opt = SubspaceSGD(groups, lr=0.05, momentum=0.9, seed=seed, **keywords)
    batches = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        k = microbatches(opt, base=1, refresh=refresh_batches)
        opt.zero_grad()
        for _ in range(k):
            idx = torch.randint(0, len(inputs), (32,), generator=batches)
            noisy = targets[idx] + 0.3 * torch.randn(32, 8, generator=batches)
            (torch.nn.functional.mse_loss(model(inputs[idx]), noisy) / k).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(inputs), targets).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m golore_lab demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)  # small tensors: threads only add overhead
    print(f"final full-batch MSE after {args.steps} steps (rank 4 of 32, refresh every 25 steps)")
    print(f"{'method':<12} {'AdamW':>10} {'momentum SGD':>14}")
    for method in METHODS:
        adamw, sgd = (train(method, opt, args.steps, args.seed) for opt in ("adamw", "sgd"))
        print(f"{method:<12} {adamw:>10.5f} {sgd:>14.5f}")
    return 0
