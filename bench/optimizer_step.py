"""Optimizer step time and state size on the parameter set of the paper's LLaMA-60M.

    python bench/optimizer_step.py [--steps 5] [--refresh-steps 3] [--vocab 32000]

Parameters: 8 layers of q, k, v, o (512 × 512), gate, up (1376 × 512) and down (512 × 1376) in the subspace
(rank 128, update_proj_gap 200), embeddings and LM head (vocab × 512) and norms in the full space, as the
paper trains it. For torch.optim.AdamW (foreach, and fused: one kernel per tensor), SubspaceAdamW with SVD
(GaLore) and random (GoLore) projections, per-tensor and batched (``foreach=True``: equal-shape matrices
stacked), and galore_torch.GaLoreAdamW, it measures the median time of a regular step and of a refresh step, the
step time amortized over one refresh every 200 steps, and the optimizer-state bytes (with the analytic count).
Each optimizer trains its own copy of the parameters on the same gradients, and the optimizers take their steps
in turn (one step each, then the next step), so that a busy machine slows them alike. Also the cost of one SVD
refresh against one random refresh of all projected matrices. All ratios are against numbers measured in the
same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from golore_lab import SubspaceAdamW
from golore_lab.projection import projected_side, random_projection, refresh_generator, svd_projection

HIDDEN, MLP, LAYERS, RANK, GAP = 512, 1376, 8, 128, 200


def parameters(vocab: int):
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN)] * 2 + [(HIDDEN, MLP)]
    matrices = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for _ in range(LAYERS) for s in shapes]
    others = [torch.nn.Parameter(torch.randn(vocab, HIDDEN, generator=g) * 0.02) for _ in range(2)]
    others += [torch.nn.Parameter(torch.ones(HIDDEN)) for _ in range(2 * LAYERS + 1)]
    return matrices, others


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix") and value.ortho_matrix is not None:  # galore-torch's projector
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


def analytic_bytes(matrices, others, subspace: bool) -> int:
    count = 0
    for p in matrices:
        m, n = p.shape
        if subspace:
            side = projected_side((m, n), "std")
            count += (m if side == "left" else n) * RANK + 2 * RANK * (n if side == "left" else m)
        else:
            count += 2 * m * n
    count += sum(2 * p.numel() for p in others)
    return 4 * count


def build(name, matrices, others):
    groups = [{"params": matrices, "rank": RANK, "update_proj_gap": GAP, "scale": 1.0, "proj_type": "std"},
              {"params": others}]
    if name.startswith("torch AdamW"):
        mode = "fused" if name.endswith("(fused)") else "foreach"
        return torch.optim.AdamW(matrices + others, lr=1e-3, weight_decay=0.0, **{mode: True})
    if name.startswith("SubspaceAdamW"):
        groups[0]["foreach"] = name.endswith("batched")
        return SubspaceAdamW(groups, lr=1e-3, projection=name.split()[1])
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="regular steps timed per period and method")
    parser.add_argument("--refresh-steps", type=int, default=3, help="refresh steps (periods) timed per method")
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    matrices, others = parameters(args.vocab)
    params = matrices + others
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    names = ["torch AdamW (foreach)", "torch AdamW (fused)", "SubspaceAdamW svd", "SubspaceAdamW svd batched",
             "SubspaceAdamW random", "SubspaceAdamW random batched", "galore_torch GaLoreAdamW"]
    runs = {}  # each optimizer trains its own copy of the parameters
    for name in names:
        own = ([torch.nn.Parameter(p.detach().clone()) for p in matrices],
               [torch.nn.Parameter(p.detach().clone()) for p in others])
        runs[name] = (build(name, *own), own[0], own[0] + own[1], [], [])
    for step in range(GAP * args.refresh_steps):
        middle = step % GAP > args.steps and step % GAP != GAP - 1
        for name, (opt, own_matrices, own_params, regular, refresh) in runs.items():  # interleaved: one step each
            if middle:  # skip the middle of a period cheaply: count the subspace steps without taking them
                if not name.startswith("torch"):
                    for p in own_matrices:
                        opt.state[p]["step"] += 1
                continue
            for p, grad in zip(own_params, grads):
                p.grad = grad
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if step % GAP == 0:
                refresh.append(elapsed)
            elif step % GAP <= args.steps:
                regular.append(elapsed)
    rows = {}
    for name, (opt, _, _, regular, refresh) in runs.items():
        reg = statistics.median(regular)
        ref = statistics.median(refresh) if not name.startswith("torch") else reg
        rows[name] = dict(regular=reg, refresh=ref, amortized=(reg * (GAP - 1) + ref) / GAP, bytes=state_bytes(opt))

    print(f"LLaMA-60M parameter set (vocab {args.vocab}), rank {RANK}, update_proj_gap {GAP}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.steps} regular steps "
          f"and 1 refresh step in each of {args.refresh_steps} periods, optimizers interleaved step by step")
    base = rows["torch AdamW (foreach)"]["amortized"]
    print(f"{'optimizer':<28} {'step ms':>8} {'refresh ms':>11} {'amortized ms':>13} {'vs AdamW':>9} "
          f"{'state MiB':>10} {'analytic MiB':>13}")
    for name, row in rows.items():
        analytic = analytic_bytes(matrices, others, subspace=not name.startswith("torch"))
        print(f"{name:<28} {row['regular'] * 1e3:>8.1f} {row['refresh'] * 1e3:>11.1f} {row['amortized'] * 1e3:>13.1f} "
              f"{row['amortized'] / base:>8.2f}x {row['bytes'] / 2**20:>10.1f} {analytic / 2**20:>13.1f}")
    theirs = rows["galore_torch GaLoreAdamW"]
    for name in ("SubspaceAdamW svd", "SubspaceAdamW svd batched"):
        ours = rows[name]
        print(f"{name} vs galore-torch: amortized time ratio {ours['amortized'] / theirs['amortized']:.2f} "
              f"(target <= 0.75), state bytes ratio {ours['bytes'] / theirs['bytes']:.3f} (target <= 1)")
    fused = rows["torch AdamW (fused)"]["amortized"]
    for name in ("SubspaceAdamW random", "SubspaceAdamW random batched"):
        print(f"{name} vs torch AdamW (foreach): amortized time ratio {rows[name]['amortized'] / base:.2f} "
              f"(target <= 1.2); vs torch AdamW (fused): {rows[name]['amortized'] / fused:.2f}")

    # one refresh of every projected matrix: the projector alone
    times = {"svd": [], "random": []}
    for _ in range(3):
        for kind, projector in (("svd", svd_projection), ("random", random_projection)):
            start = time.perf_counter()
            for i, (p, grad) in enumerate(zip(matrices, grads)):
                projector(grad, RANK, projected_side(tuple(p.shape), "std"), refresh_generator(0, i, 0))
            times[kind].append(time.perf_counter() - start)
    svd, rnd = statistics.median(times["svd"]), statistics.median(times["random"])
    print(f"one refresh of all {len(matrices)} matrices: SVD {svd * 1e3:.0f} ms, random {rnd * 1e3:.1f} ms, "
          f"random is {svd / rnd:.0f}x cheaper (target >= 10x)")


if __name__ == "__main__":
    main()
