"""Bytes all-reduced per step and step time under DDP: full training, the optimizer path, the wrapper path.

    torchrun --standalone --nproc-per-node 2 bench/ddp_traffic.py [--model 60m --layers 2 --vocab 1024]
        [--rank 128] [--gap 5] [--projection svd|random] [--steps 16] [--batch 4] [--seq 128] [--out traffic.json]

gloo on the CPU, one thread per rank. The three paths train the same LLaMA (``golore_lab.lm.model``; default:
the paper's 60M widths -- dim 512, MLP 1376, 8 heads -- with 2 layers and a 1024-token vocabulary so that the
attention and MLP matrices dominate) on the same random tokens, interleaved step by step so that a busy
machine slows each alike:

* ``full``: ``torch.optim.AdamW`` on the plain model;
* ``optimizer``: ``SubspaceAdamW`` over ``llama_param_groups`` (the GaLore / GoLore optimizer path);
* ``wrapper``: ``SubspaceModel`` + ``torch.optim.AdamW``;
* ``layerwise``: the optimizer path with in-backward steps (``layerwise(opt, ddp=ddp)``), whose DDP communication
  hook all-reduces each subspace matrix's projected gradient (r × n or m × r) instead of its gradient, except
  where a refresh needs the gradient itself (GaLore's SVD).

Bytes are counted by a DDP communication hook (the size of every gradient bucket it all-reduces, and the part
of it that belongs to the attention / MLP matrices or their factors) plus, for the wrapper, what
``refresh()`` all-reduces explicitly; for ``layerwise``, by the layer-wise hook itself (``reduced_bytes``), the
matrices' part being that total less the full-space parameters' bytes. Step time is forward + backward +
all-reduce + optimizer step, after a barrier, on rank 0; medians over the measured steps, split into refresh
steps (``t % gap == 0``) and the rest.
"Amortized over tau" is ((tau − 1)·between + refresh) / tau, for the measured gap and for tau = 200.

``--projection svd`` (default) measures GaLore: the wrapper refreshes after backward from the all-reduced full
gradients. ``--projection random`` measures GoLore: the wrapper refreshes before the forward and all-reduces
nothing full-size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab import SubspaceAdamW  # noqa: E402
from golore_lab.optim import layerwise  # noqa: E402
from golore_lab.lm.model import LlamaConfig, build_model, is_subspace_weight, llama_param_groups  # noqa: E402
from golore_lab.wrapper import SubspaceModel  # noqa: E402

PATHS = ("full", "optimizer", "wrapper", "layerwise")


class Counter:
    """DDP comm hook state: bytes all-reduced, and those of the subspace matrices (or factors)."""

    def __init__(self, matrices: set[int]):
        self.matrices, self.total, self.matrix = matrices, 0, 0
        self.others = 0   # layerwise: the full-space parameters' bytes, reduced in full at every step

    def reset(self) -> None:
        self.total = self.matrix = 0


def counting_allreduce(counter, bucket):  # no annotations: DDP checks them, and they are strings here
    buffer = bucket.buffer()
    counter.total += buffer.numel() * buffer.element_size()
    counter.matrix += sum(p.numel() * p.element_size() for p in bucket.parameters() if id(p) in counter.matrices)
    return default_hooks.allreduce_hook(None, bucket)


def build(path: str, cfg: LlamaConfig, rank: int, gap: int, projection: str, lr: float):
    model = build_model(cfg, seed=0)
    if path == "wrapper":
        model = SubspaceModel(model, rank=rank, target_modules=["attn", "mlp"], update_proj_gap=gap,
                              projection=projection)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.attach(opt)
        matrices = {id(p) for p in model.factor_parameters()}
    else:
        subspace = path in ("optimizer", "layerwise")
        groups = llama_param_groups(model, rank=rank, update_proj_gap=gap, projection=projection) \
            if subspace else llama_param_groups(model)
        opt = SubspaceAdamW(groups, lr=lr) if subspace else torch.optim.AdamW(model.parameters(), lr=lr,
                                                                              weight_decay=0.0)
        matrices = {id(p) for n, p in model.named_parameters() if is_subspace_weight(n, p)}
    ddp = nn.parallel.DistributedDataParallel(model)
    counter = Counter(matrices)
    steps = None
    if path == "layerwise":
        steps = layerwise(opt, ddp=ddp)   # its own communication hook counts what it all-reduces
        counter.others = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in matrices)
    else:
        ddp.register_comm_hook(counter, counting_allreduce)
    return {"model": model, "ddp": ddp, "opt": opt, "counter": counter, "steps": steps, "rows": []}


def step(run: dict, path: str, tokens: torch.Tensor) -> dict:
    ddp, opt, counter = run["ddp"], run["opt"], run["counter"]
    refresh = (run["model"].refresh_due() if path == "wrapper" else
               path in ("optimizer", "layerwise") and opt.refresh_due())
    counter.reset()
    if run["steps"] is not None:
        run["steps"].reduced_bytes = 0
    dist.barrier()
    t0 = time.perf_counter()
    early = 0
    if path == "wrapper" and refresh and not run["model"].refresh_needs_gradient():
        early = run["model"].refresh(opt)
    logits = ddp(tokens[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    explicit = early + (run["model"].refresh(opt) if path == "wrapper" and run["model"].refresh_due() else 0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    if run["steps"] is not None:
        total = run["steps"].reduced_bytes
        return {"refresh": bool(refresh), "seconds": seconds, "bytes": total, "matrix_bytes": total - counter.others,
                "explicit_bytes": 0}
    return {"refresh": bool(refresh), "seconds": seconds, "bytes": counter.total + explicit,
            "matrix_bytes": counter.matrix + explicit, "explicit_bytes": explicit}


def summarize(rows: list[dict], gap: int) -> dict:
    def median(key, refresh):
        values = [r[key] for r in rows if r["refresh"] == refresh]
        return statistics.median(values) if values else float("nan")

    out = {}
    for key in ("seconds", "bytes", "matrix_bytes"):
        between, at = median(key, False), median(key, True)
        if at != at:  # no refresh steps (full training)
            at = between
        out[key] = {"between": between, "refresh": at,
                    "amortized_gap": ((gap - 1) * between + at) / gap,
                    "amortized_200": (199 * between + at) / 200}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="60m", help="LlamaConfig preset for the widths (tiny, cpu, 60m)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=5, help="update_proj_gap of the measured run")
    parser.add_argument("--projection", default="svd", choices=["svd", "random"], help="GaLore or GoLore")
    parser.add_argument("--steps", type=int, default=16, help="measured steps per path (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig.preset(args.model, n_layers=args.layers, vocab_size=args.vocab, max_seq_len=args.seq)
    runs = {path: build(path, cfg, args.rank, args.gap, args.projection, 1e-3) for path in PATHS}
    g = torch.Generator().manual_seed(1000 + rank)
    for t in range(args.steps + 2):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        for path in PATHS:
            row = step(runs[path], path, tokens)
            if t >= 2:
                runs[path]["rows"].append(row)
    results = {path: summarize(runs[path]["rows"], args.gap) for path in PATHS}
    for path in PATHS:  # every rank must agree on what it sent
        sent = torch.tensor([r["bytes"] for r in runs[path]["rows"]], dtype=torch.float64)
        gathered = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(gathered, sent)
        assert all(torch.equal(sent, other) for other in gathered), path
    if rank == 0:
        report(results, cfg, args, world)
        if args.out:
            args.out.write_text(json.dumps({"config": cfg.to_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                                            "world": world, "results": results}, indent=2))
    dist.destroy_process_group()


def report(results: dict, cfg: LlamaConfig, args, world: int) -> None:
    mb = 1 / 2**20
    print(f"LLaMA dim {cfg.dim}, MLP {cfg.hidden_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}; rank {args.rank}, "
          f"gap {args.gap}, {args.projection}; {world} ranks x {args.batch} x {args.seq} tokens; gloo, 1 thread per rank")
    print(f"{'path':<10} {'MiB/step between':>17} {'at refresh':>11} {'amort. tau=200':>15} "
          f"{'matrices MiB':>13} {'s/step between':>15} {'at refresh':>11} {'amort. gap':>11} {'amort. 200':>11}")
    for path, r in results.items():
        b, s, mtx = r["bytes"], r["seconds"], r["matrix_bytes"]
        print(f"{path:<10} {b['between'] * mb:17.2f} {b['refresh'] * mb:11.2f} {b['amortized_200'] * mb:15.2f} "
              f"{mtx['between'] * mb:13.2f} {s['between']:15.3f} {s['refresh']:11.3f} {s['amortized_gap']:11.3f} "
              f"{s['amortized_200']:11.3f}")
    opt, wrap, full = results["optimizer"], results["wrapper"], results["full"]
    rank = args.rank
    target = sum(rank / min(m, n) * m * n for m, n in
                 [(cfg.dim, cfg.dim)] * 4 + [(cfg.hidden_dim, cfg.dim)] * 3) / (4 * cfg.dim**2 + 3 * cfg.dim * cfg.hidden_dim)
    print(f"wrapper / optimizer, matrices' bytes between refreshes: "
          f"{wrap['matrix_bytes']['between'] / opt['matrix_bytes']['between']:.4f} (r/min(m, n) = {target:.4f})")
    print(f"wrapper / optimizer, all bytes: between {wrap['bytes']['between'] / opt['bytes']['between']:.4f}, "
          f"amortized tau=200 {wrap['bytes']['amortized_200'] / opt['bytes']['amortized_200']:.4f}, "
          f"at a refresh {wrap['bytes']['refresh'] / opt['bytes']['refresh']:.4f}")
    lw = results["layerwise"]
    print(f"layerwise / optimizer, matrices' bytes between refreshes: "
          f"{lw['matrix_bytes']['between'] / opt['matrix_bytes']['between']:.4f} (r/min(m, n) = {target:.4f}); "
          f"at a refresh {lw['matrix_bytes']['refresh'] / opt['matrix_bytes']['refresh']:.4f}")
    for name, other in (("optimizer", opt), ("full", full)):
        print(f"wrapper / {name} step time: between {wrap['seconds']['between'] / other['seconds']['between']:.3f}, "
              f"amortized gap {wrap['seconds']['amortized_gap'] / other['seconds']['amortized_gap']:.3f}, "
              f"amortized tau=200 {wrap['seconds']['amortized_200'] / other['seconds']['amortized_200']:.3f}")


if __name__ == "__main__":
    main()
