"""Optimizer step time and peak memory on one CUDA GPU, LLaMA-60M parameter set in bf16.

    python bench/gpu.py [--out results.json]          # < 5 minutes on one GPU; exits 0 with a message without one

Parameters as the paper's LLaMA-60M: 8 layers of q, k, v, o (512 × 512), gate, up (1376 × 512), down
(512 × 1376) in the subspace (rank 128, update_proj_gap 200), embeddings and LM head (32000 × 512) and the norms
in the full space; bf16 parameters and gradients (fixed random gradients: this times the optimizer alone).
Optimizers: ``torch.optim.AdamW(fused=True)`` (the baseline), ``torch.optim.AdamW(foreach=True)``,
``galore_torch.GaLoreAdamW`` (if importable; skipped with a message otherwise), and ``SubspaceAdamW`` with SVD
(GaLore) and random (GoLore) projections, per-tensor (``foreach=False``) and batched (``foreach=True``), the
batched GoLore also with ``finite_check="deferred"`` (no host synchronisation in a regular step).

Each optimizer runs ``gap + 20`` steps; every step is timed with CUDA events (no host synchronisation between
steps); "regular" is the median of the steps that do not refresh (after 5 warm-up steps), "refresh" the step at
``gap`` (the one at 0 also allocates the state), "amortized" = ((gap−1)·regular + refresh)/gap. Peak memory is
``torch.cuda.max_memory_allocated`` during the run, "state" the optimizer-state bytes; ratios are against
``AdamW(fused=True)`` measured in the same run. Nothing is downloaded. A configuration that fails is recorded
with its error and the others still run; configurations not started by the time budget are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab import SubspaceAdamW  # noqa: E402
from golore_lab.fileio import atomic_write_text  # noqa: E402
from optimizer_step import state_bytes  # noqa: E402  (bench/ is on the path when run as a script)

HIDDEN, MLP, LAYERS, RANK = 512, 1376, 8, 128
DEVICE = "cuda"
CONFIGS = ["torch AdamW (fused)", "torch AdamW (foreach)", "galore_torch GaLoreAdamW",
           "SubspaceAdamW svd per-tensor", "SubspaceAdamW svd batched",
           "SubspaceAdamW random per-tensor", "SubspaceAdamW random batched",
           "SubspaceAdamW random batched deferred"]


def parameters(vocab: int, layers: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN)] * 2 + [(HIDDEN, MLP)]
    make = lambda *s: torch.nn.Parameter((torch.randn(*s, generator=g) * 0.02).to(device, dtype))
    matrices = [make(*s) for _ in range(layers) for s in shapes]
    others = [make(vocab, HIDDEN) for _ in range(2)] + [torch.nn.Parameter(torch.ones(HIDDEN, device=device,
                                                                                          dtype=dtype))
                                                         for _ in range(2 * layers + 1)]
    for p in matrices + others:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    return matrices, others


def build(name: str, matrices, others, gap: int):
    if name == "torch AdamW (fused)":
        return torch.optim.AdamW(matrices + others, lr=1e-3, weight_decay=0.0, fused=True)
    if name == "torch AdamW (foreach)":
        return torch.optim.AdamW(matrices + others, lr=1e-3, weight_decay=0.0, foreach=True)
    group = {"params": matrices, "rank": RANK, "update_proj_gap": gap, "scale": 1.0, "proj_type": "std"}
    if name.startswith("galore_torch"):
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW([group, {"params": others}], lr=1e-3, no_deprecation_warning=True)
    group["foreach"] = "batched" in name
    opt = SubspaceAdamW([group, {"params": others}], lr=1e-3, projection="svd" if " svd " in name else "random")
    if name.endswith("deferred"):
        opt.finite_check = "deferred"
    return opt


def measure(name: str, args) -> dict:
    torch.cuda.empty_cache()
    matrices, others = parameters(args.vocab, args.layers, args.device, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt = build(name, matrices, others, args.gap)
    steps = args.gap + 20
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        opt.step()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) / 1e3 for start, end in events]
    if hasattr(opt, "raise_if_nonfinite"):
        opt.raise_if_nonfinite()
    regular = statistics.median(t for i, t in enumerate(times) if i >= 5 and i % args.gap)
    refresh = times[args.gap] if not name.startswith("torch") else regular
    row = dict(regular_s=regular, refresh_s=refresh, first_step_s=times[0],
               amortized_s=((args.gap - 1) * regular + refresh) / args.gap, state_bytes=state_bytes(opt),
               peak_bytes_above_params_and_grads=torch.cuda.max_memory_allocated() - base)
    del opt, matrices, others
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default: print)")
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap (steps timed: gap + 20)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; configurations not started by then "
                                                                     "are skipped")
    args = parser.parse_args()
    args.device = DEVICE
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU available; nothing measured (this is not an error).")
        return 0
    try:
        import galore_torch  # noqa: F401
        have_galore = True
    except Exception as error:  # noqa: BLE001 -- its bitsandbytes import can fail in other ways than ImportError
        have_galore = False
        print(f"galore_torch is not importable ({type(error).__name__}: {error}): its configuration is skipped")
    began = time.perf_counter()
    rows: dict[str, dict] = {}
    for name in CONFIGS:
        if name.startswith("galore_torch") and not have_galore:
            rows[name] = {"skipped": "galore_torch not importable"}
            continue
        if time.perf_counter() - began > args.budget:
            rows[name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        try:
            rows[name] = measure(name, args)
        except Exception as error:  # noqa: BLE001 -- one failing configuration must not lose the others
            rows[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        print(f"{name:<40} {json.dumps({k: v for k, v in rows[name].items() if k != 'traceback'})}", flush=True)

    base = rows.get("torch AdamW (fused)", {}).get("amortized_s")
    galore = rows.get("galore_torch GaLoreAdamW", {}).get("amortized_s")
    for row in rows.values():
        if "amortized_s" in row:
            row["vs_adamw_fused"] = row["amortized_s"] / base if base else None
            row["vs_galore_torch"] = row["amortized_s"] / galore if galore else None
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bfloat16", rank=RANK,
                  update_proj_gap=args.gap, layers=args.layers, vocab=args.vocab,
                  wall_s=time.perf_counter() - began, results=rows)
    print(f"\n{'optimizer':<40} {'step ms':>8} {'refresh ms':>11} {'amortized ms':>13} {'vs fused':>9} "
          f"{'vs galore':>10} {'state MiB':>10} {'peak MiB':>9}")
    for name, row in rows.items():
        if "amortized_s" not in row:
            print(f"{name:<40} {row.get('skipped') or row.get('error')}")
            continue
        vs = lambda r: f"{r:.2f}x" if r else "-"
        print(f"{name:<40} {row['regular_s'] * 1e3:>8.2f} {row['refresh_s'] * 1e3:>11.1f} "
              f"{row['amortized_s'] * 1e3:>13.2f} {vs(row['vs_adamw_fused']):>9} {vs(row['vs_galore_torch']):>10} "
              f"{row['state_bytes'] / 2**20:>10.1f} {row['peak_bytes_above_params_and_grads'] / 2**20:>9.1f}")
    text = json.dumps(result, indent=2)
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
