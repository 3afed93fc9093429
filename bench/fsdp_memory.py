"""Per-rank memory of parameters, gradients and optimizer state: FSDP2 vs DDP, full AdamW vs GaLore / GoLore.

    torchrun --standalone --nproc-per-node 2 bench/fsdp_memory.py [--layers 8] [--vocab 32000] [--out FILE]

LLaMA-60M widths (dim 512, MLP 1376, 8 heads; ``--layers`` of them, 8 in the paper), rank 128, gloo on CPU.
Each configuration builds the model, takes one optimizer step on a small batch (so that gradients and state
exist) and counts, on every rank, the bytes that rank holds (a DTensor's local shard; a replicated tensor in full):

* ``params``, ``grads``;
* ``moments``: the optimizer's moments of the subspace matrices (``exp_avg``, ``exp_avg_sq``), r-sized;
* ``bases``: the projection bases (replicated on every rank, counted apart);
* ``full_state``: the AdamW moments of the parameters trained in the full space (embeddings, head, norms; every
  parameter for full AdamW).

Configurations: full AdamW + FSDP2; GaLore / GoLore + DDP (what one process holds); GaLore / GoLore + FSDP2
(the projected side of a row-sharded matrix is the unsharded one, so the moments are sharded by rows). The goal:
with GoLore + FSDP2 each rank holds exactly half of the single-process moments of the same projected sides
(``proj_type="right"``), and its per-rank total is below every other configuration's. DDP's reducer also keeps
gradient buckets (not counted). Rank 0 prints the table and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab import SubspaceAdamW  # noqa: E402
from golore_lab.distributed import local, shard_model  # noqa: E402
from golore_lab.fileio import atomic_write_text  # noqa: E402
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups  # noqa: E402

RANK = 128
CONFIGS = ["full AdamW + FSDP2", "GaLore + DDP", "GoLore + DDP", "GaLore + FSDP2", "GoLore + FSDP2",
           "GoLore single process, right side"]


def nbytes(t: torch.Tensor) -> int:
    t = local(t)
    return t.numel() * t.element_size()


def measure(name: str, cfg: LlamaConfig) -> dict[str, int]:
    model = build_model(cfg, seed=0)
    fsdp, ddp = "FSDP2" in name, "DDP" in name
    if fsdp:
        shard_model(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    if name.startswith("full"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        proj_type = "right" if name.endswith("right side") else "std"
        groups = llama_param_groups(model, rank=RANK, update_proj_gap=200, proj_type=proj_type)
        opt = SubspaceAdamW(groups, lr=1e-3, projection="svd" if name.startswith("GaLore") else "random")
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(dist.get_rank()))
    F.cross_entropy(wrapped(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    matrices = {id(p) for p in llama_param_groups(model)[0]["params"]} if not name.startswith("full") else set()
    row = dict(params=sum(nbytes(p) for p in model.parameters()),
               grads=sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
               moments=0, bases=0, full_state=0)
    for p, state in opt.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue  # step counters
            if key == "proj":
                row["bases"] += nbytes(value)
            elif id(p) in matrices:
                row["moments"] += nbytes(value)
            else:
                row["full_state"] += nbytes(value)
    row["total"] = row["params"] + row["grads"] + row["moments"] + row["bases"] + row["full_state"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    cfg = LlamaConfig.preset("60m", vocab_size=args.vocab, n_layers=args.layers)
    rows = {}
    for name in CONFIGS:
        rows[name] = measure(name, cfg)  # "single process": plain tensors, every rank alike
        dist.barrier()
    if dist.get_rank() == 0:
        report(rows, args)
    dist.destroy_process_group()


def report(rows: dict[str, dict[str, int]], args) -> None:
    mib = lambda b: f"{b / 2**20:9.1f}"
    keys = ["params", "grads", "moments", "bases", "full_state", "total"]
    print(f"per-rank MiB, LLaMA-60M widths, {args.layers} layers, vocab {args.vocab}, rank {RANK}, 2 ranks "
          f"(gloo, CPU), torch {torch.__version__}")
    print(f"{'configuration':<36}" + "".join(f"{k:>11}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<36}" + "".join(f"{mib(row[k]):>11}" for k in keys))
    golore = rows["GoLore + FSDP2"]
    single = rows["GoLore single process, right side"]
    exact = 2 * golore["moments"] == single["moments"]
    print(f"GoLore + FSDP2 moments per rank / single-process moments (same sides): "
          f"{golore['moments'] / single['moments']:.4f} (goal 0.5 exactly; exact: {exact})")
    print(f"GoLore + FSDP2 moments per rank / GoLore + DDP moments (proj_type='std'): "
          f"{golore['moments'] / rows['GoLore + DDP']['moments']:.4f}")
    for name, row in rows.items():
        if name != "GoLore + FSDP2" and "single" not in name:
            print(f"GoLore + FSDP2 total / {name} total: {golore['total'] / row['total']:.3f}")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(dict(layers=args.layers, vocab=args.vocab, rank=RANK, rows=rows),
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
