"""Run by tests/test_layerwise_dist.py under torchrun (gloo, 2 CPU processes): layer-wise steps under DDP (through
its communication hook) and under FSDP2 (its per-parameter hooks on the reduce-scattered shards), against the
ordinary step of one process on the same global batch.

``layerwise_dist_worker.py OUT``: for each (rule, projection) of :data:`CASES` and each engine of :data:`ENGINES`,
rank r trains the small LLaMA of tests/test_layerwise.py for :data:`STEPS` steps of :data:`K` micro-batches (its
micro-batches (r, i) of every step), and saves its final weights, the bytes the layer-wise DDP hook all-reduced at
each step, and -- rank 0 only -- each engine's one-process references: the ordinary ``step()`` over all 2·K
micro-batches, and the same with the micro-batches summed in the other order (the perturbation the tolerance
comes from).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_layerwise import CFG, PROJECTIONS, RULES  # noqa: E402
from golore_lab.lm.model import build_model, llama_param_groups  # noqa: E402
from golore_lab.optim import layerwise  # noqa: E402

CASES = [(rule, projection) for rule in RULES for projection in PROJECTIONS]
ENGINES = ("ddp", "fsdp")
STEPS, K, GAP, RANK = 8, 2, 5, 4   # refreshes at steps 0 and 5; "switch" turns random at step 5


def batch(step: int, rank: int, micro: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randint(0, CFG.vocab_size, (2, 17), generator=generator)


def loss_of(net, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())


def make(rule: str, projection: str, engine: str, shard: bool = True):
    """The model and optimizer of ``engine``'s runs (``shard`` False: the one-process reference of them)."""
    model = build_model(CFG, 0)
    if engine == "fsdp" and shard:
        from golore_lab.distributed import shard_model

        shard_model(model, blocks="layers")
    cls, hyper = RULES[rule]
    side = dict(proj_type="right") if engine == "fsdp" else {}   # what "std" picks for every row-sharded matrix
    return model, cls(llama_param_groups(model, rank=RANK, update_proj_gap=GAP, **PROJECTIONS[projection], **side),
                      **hyper)


def full_weights(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distributed(rule: str, projection: str, engine: str, rank: int) -> dict:
    model, opt = make(rule, projection, engine)
    if engine == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.02)   # several buckets: 20 kB each
        steps = layerwise(opt, ddp=net)
    else:
        net, steps = model, layerwise(opt)
    sent, early = [], []
    params = list(model.parameters())
    for t in range(STEPS):
        steps.reduced_bytes = 0
        steps.expect(K)
        before = [p.detach().clone() for p in params]
        for i in range(K):
            sync = net.no_sync() if engine == "ddp" and i < K - 1 else _nothing()
            with sync:
                (loss_of(net, batch(t, rank, i)) / K).backward()
        early.append(sum(not torch.equal(b, p.detach()) for b, p in zip(before, params)))  # stepped in backward
        opt.step()
        sent.append(steps.reduced_bytes)
    return {"weights": full_weights(model), "bytes": sent, "stepped_in_backward": early, "parameters": len(params),
            "switches": [(e["position"], e["step"]) for e in opt.switch_log()]}


def reference(rule: str, projection: str, engine: str, world: int, reverse: bool) -> dict:
    model, opt = make(rule, projection, engine, shard=False)
    order = [(r, i) for r in range(world) for i in range(K)]
    for t in range(STEPS):
        for r, i in (reversed(order) if reverse else order):
            (loss_of(model, batch(t, r, i)) / len(order)).backward()
        opt.step()
        opt.zero_grad()
    return {"weights": full_weights(model)}


def nonfinite(rank: int) -> dict:
    """GoLore under layer-wise DDP, a NaN loss on rank 1 only at the last micro-batch of step 2: what each rank
    raises, and how many parameters changed in that step."""
    model, opt = make("adamw", "random", "ddp")
    net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.02)
    steps = layerwise(opt, ddp=net)
    for t in range(3):
        steps.expect(K)
        before = [p.detach().clone() for p in model.parameters()]
        try:
            for i in range(K):
                with net.no_sync() if i < K - 1 else _nothing():
                    loss = loss_of(net, batch(t, rank, i)) / K
                    (loss * float("nan") if (t, rank, i) == (2, 1, K - 1) else loss).backward()
            opt.step()
        except FloatingPointError as error:
            changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
            return {"step": t, "error": str(error), "changed": changed}
    return {"step": None}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    for rule, projection in CASES:
        for engine in ENGINES:
            torch.save(distributed(rule, projection, engine, rank), out / f"{rule}-{projection}-{engine}-rank{rank}.pt")
            if rank == 0:
                for reverse in (False, True):
                    torch.save(reference(rule, projection, engine, world, reverse),
                               out / f"{rule}-{projection}-{engine}-one{'-reversed' * reverse}.pt")
    torch.save(nonfinite(rank), out / f"nonfinite-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
