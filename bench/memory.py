"""Peak memory of a training step, measured in a fresh process per configuration, beside its analytic breakdown.

    python bench/memory.py [--sizes 60m 350m] [--configs full galore golore galore-wrapper ...] [--steps 3]
        [--device cpu|cuda] [--dry-run] [--out bench/results/memory_cpu.json]
    python bench/memory.py --plot RESULTS.json ... --out FIGURE.png

LLaMA widths of the paper's configurations (``golore_lab.lm.model.PRESETS``: 60m, 350m, 1b -- GaLore's
llama_1b: hidden 2048, MLP 5461, 24 layers, 32 heads), vocabulary 32 000, one sequence of 256 tokens per step,
activation checkpointing, float32, AdamW; rank 128 / 256 / 512 (GaLore's ranks for these sizes), τ = 200.
Configurations (``CONFIGS``): full AdamW, GaLore and GoLore on the optimizer path, GaLore and GoLore on the
wrapper path, and layer-wise full AdamW, GaLore and GoLore. Each runs in its own process (``--one``), through
the training program's own step (``golore_lab.lm.trainer.Trainer.train_step`` over its ``TrainPath``), on one
fixed batch of random tokens (so the loss must fall).

Measured: on the CPU the high-water mark of resident memory (``VmHWM``) minus the resident memory before the
model was built (the interpreter and libraries); on CUDA ``torch.cuda.max_memory_allocated``. Analytic: the
program's own estimate (``golore_lab.lm.memory``: weights, gradients, state, bases, activations, runtime, heap;
on CUDA without the runtime and heap terms, which are not torch allocator's). ``--reanalyse`` recomputes the
analytic columns of saved results with the current estimate, keeping what was measured.

Before a configuration runs, its analytic peak is checked against the memory available now
(``memory.available_bytes`` and ``HEADROOM``, as the training program checks): one that does not fit is
reported as refused and never started. On CUDA the script runs unchanged (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab.lm import memory  # noqa: E402
from golore_lab.lm.config import TrainConfig  # noqa: E402
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups  # noqa: E402

RANKS = {"60m": 128, "350m": 256, "1b": 512, "tiny": 8, "cpu": 32}
VOCAB, SEQ = 32_000, 256
#: name: (method, path, layerwise)
CONFIGS = {
    "full": ("full", "optimizer", False),
    "galore": ("galore", "optimizer", False),
    "golore": ("golore@100", "optimizer", False),
    "galore-wrapper": ("galore", "wrapper", False),
    "golore-wrapper": ("golore@100", "wrapper", False),
    "full-layerwise": ("full", "optimizer", True),
    "galore-layerwise": ("galore", "optimizer", True),
    "golore-layerwise": ("golore@100", "optimizer", True),
}


class RandomTokens:
    """A ``train.Task`` over one fixed batch of random tokens (the bench needs no corpus)."""

    def __init__(self, size: str, seed: int = 0):
        self.model_cfg = LlamaConfig.preset(size, vocab_size=VOCAB, max_seq_len=SEQ)
        self.tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(seed))

    def build_model(self, seed: int):
        return build_model(self.model_cfg, seed)

    def param_groups(self, model, **subspace):
        return llama_param_groups(model, **subspace)

    def batch(self, start: int, count: int, seed: int):
        return self.tokens.expand(count, -1)

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten())

    def count_tokens(self, batch) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def activation_bytes(self, micro_batch: int, checkpoint: bool = False) -> int:
        c = self.model_cfg
        return memory.llama_activation_bytes(c.dim, c.n_layers, c.hidden_dim, c.vocab_size, micro_batch, SEQ,
                                             checkpoint=checkpoint)

    def evaluate(self, model):
        return {}

    def options(self) -> dict:
        return {}


def train_config(size: str, name: str, steps: int) -> TrainConfig:
    method, path, layerwise = CONFIGS[name]
    return TrainConfig(method=method, path=path, layerwise=layerwise, checkpoint_activations=True, steps=steps,
                       batch_size=1, micro_batch_size=1, lr=1e-3, schedule="constant", grad_clip=0.0,
                       rank=RANKS[size], update_proj_gap=200, device="cpu", progress=False)


def analytic(size: str, name: str, device: torch.device) -> memory.StepMemory:
    """The program's estimate, from the model built on the meta device (no memory)."""
    from golore_lab.lm.paths import make_path

    task, cfg = RandomTokens(size), train_config(size, name, 1)
    with torch.device("meta"):
        path = make_path(task, cfg, torch.device("meta"), 1, 0)
    fixed, tensors = path.fixed_bytes(1), task.activation_bytes(1, checkpoint=True)
    step = memory.StepMemory.of(fixed, tensors, memory.ALLOCATOR_CHECKPOINTED)
    # torch's caching allocator on CUDA: tensor bytes, no runtime or heap term
    return step if device.type == "cpu" else dataclasses.replace(step, activations=tensors, runtime=0, heap=0)


def status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def one(size: str, name: str, steps: int, device: torch.device) -> dict:
    """Run ``steps`` steps of one configuration in this (fresh) process; the measured peak and the losses."""
    from golore_lab.lm.paths import make_path
    from golore_lab.lm.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    task, cfg = RandomTokens(size), train_config(size, name, steps)
    cfg = cfg if device.type == "cpu" else dataclasses.replace(cfg, device="cuda")
    base = status("VmRSS") if device.type == "cpu" else 0
    start = time.perf_counter()
    path = make_path(task, cfg, device, 1, 0)
    path.build_optimizer()
    trainer = Trainer(task, cfg, path, device, 0, 1, 1, {}, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, peaks = [], []
    for _ in range(steps):
        losses.append(trainer.train_step())
        peaks.append(status("VmHWM") - base if device.type == "cpu" else torch.cuda.max_memory_allocated(device))
    return {"measured": peaks[-1], "peaks": peaks, "losses": losses, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["60m", "350m"], choices=sorted(RANKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dry-run", action="store_true", help="the analytic breakdowns only; nothing is run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", nargs="+", type=Path, metavar="JSON", help="plot these --out files to --out")
    parser.add_argument("--reanalyse", nargs="+", type=Path, metavar="JSON",
                        help="recompute the analytic breakdown of these --out files with the current estimate (the "
                             "measured peaks kept) and rewrite them")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.plot:
        plot(args.plot, args.out)
        return
    if args.one:
        print(json.dumps(one(*args.one, args.steps, device)))
        return
    if args.reanalyse:
        for path in args.reanalyse:
            reanalyse(path)
        return
    rows = []
    for size in args.sizes:
        for name in args.configs:
            estimate = analytic(size, name, device)
            available = memory.available_bytes(device)
            row = {"size": size, "config": name, "analytic": estimate.terms(), "analytic_total": estimate.total,
                   "available": available}
            if args.dry_run:
                row["dry_run"] = True
            elif available is not None and estimate.total > memory.HEADROOM * available:
                row["refused"] = refusal(estimate, available)
            else:
                out = subprocess.run([sys.executable, __file__, "--one", size, name, "--steps", str(args.steps),
                                      "--device", args.device], capture_output=True, text=True, check=True)
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                row["ratio"] = row["measured"] / estimate.total
            rows.append(row)
            report(row)
            if args.out:
                args.out.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "steps": args.steps,
                                                "rows": rows}, indent=1) + "\n")


def refusal(estimate: memory.StepMemory, available: int) -> str:
    return (f"needs {estimate.describe()}, {available / memory.GiB:.2f} GiB available ({memory.HEADROOM:.0%} may be "
            "planned)")


def reanalyse(path: Path) -> None:
    """Rewrite the ``--out`` file ``path`` with each row's analytic breakdown from the current estimate (after a
    recalibration of :mod:`golore_lab.lm.memory`); the measured peaks, losses and refusals stay as measured."""
    saved = json.loads(path.read_text())
    device = torch.device(saved["device"])
    for row in saved["rows"]:
        estimate = analytic(row["size"], row["config"], device)
        row.update(analytic=estimate.terms(), analytic_total=estimate.total)
        if "measured" in row:
            row["ratio"] = row["measured"] / estimate.total
        if "refused" in row:
            row["refused"] = refusal(estimate, row["available"])
        report(row)
    path.write_text(json.dumps(saved, indent=1) + "\n")


def plot(results: list[Path], out: Path) -> None:
    """Bars: the analytic breakdown of every configuration run or refused (stacked terms), the measured peak
    beside it (a black bar), from the ``--out`` files ``results``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for path in results for row in json.loads(path.read_text())["rows"] if "dry_run" not in row]
    terms = list(rows[0]["analytic"])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, row in enumerate(rows):
        bottom = 0.0
        for j, term in enumerate(terms):
            value = row["analytic"][term] / memory.GiB
            ax.bar(i - 0.2, value, 0.4, bottom=bottom, color=f"C{j}", label=term if i == 0 else None)
            bottom += value
        if "measured" in row:
            ax.bar(i + 0.2, row["measured"] / memory.GiB, 0.4, color="black", label="measured" if i == 0 else None)
        else:
            ax.text(i + 0.25, bottom / 2, "refused by the\nmemory check", rotation=90, ha="center", va="center",
                    fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['size']}\n{r['config']}" for r in rows], rotation=60, ha="right",
                  fontsize=8)
    ax.set_ylabel("peak memory of a step (GiB)")
    ax.set_title("One step, 1 x 256 tokens, activation checkpointing, AdamW: analytic (stacked) and measured")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(row: dict) -> None:
    mib = 1 / memory.MiB
    terms = " ".join(f"{k} {v * mib:.0f}" for k, v in row["analytic"].items())
    if "refused" in row or "dry_run" in row:
        why = f"refused: {row['refused']}" if "refused" in row else f"analytic {row['analytic_total'] * mib:8.0f} MiB"
        print(f"{row['size']:>5} {row['config']:<17} {why}; {terms}", flush=True)
        return
    losses = ", ".join(f"{x:.3f}" for x in row["losses"])
    print(f"{row['size']:>5} {row['config']:<17} measured {row['measured'] * mib:8.0f} MiB, analytic "
          f"{row['analytic_total'] * mib:8.0f} MiB ({row['ratio']:.3f}); {terms}; losses {losses}; "
          f"{row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
