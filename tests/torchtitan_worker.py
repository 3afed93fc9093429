"""Worker for tests/test_torchtitan.py: ``torchrun --standalone --nproc-per-node W torchtitan_worker.py OUT``.

A toy model with torchtitan Llama's parameter names (``tok_embeddings``, ``layers.{i}.attention.w{q,k,v,o}``,
``layers.{i}.attention_norm``, ``layers.{i}.feed_forward.w{1,2,3}``, ``norm``, ``output``), sharded with FSDP2
(``fully_shard`` per block and at the root, gloo, CPU), trained by torchtitan's container (our subclass) and LR
scheduler, checkpointed by torchtitan's ``CheckpointManager`` (DCP). torchtitan's own models import triton, which
the CPU build of torch does not have, hence the toy.

For each run of :data:`RUNS` it writes ``OUT/<run>-world<W>-rank<r>.pt`` with the full parameters after
``STEPS`` steps of:

* ``straight``: the steps in one go, the checkpointer saving every ``INTERVAL`` steps;
* ``resumed``: a fresh model, container, scheduler and checkpointer that load step ``INTERVAL`` and continue;
* ``state_dict_first``: the container's ``state_dict()`` called before the first step (torchtitan's
  ``init_optim_state`` runs its zero-gradient step), then the steps;
* ``unguarded``: the same with torchtitan's plain ``init_optim_state`` on the inner optimizer, which the container
  cannot see (what would happen without the container's handling).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from golore_lab.integrations.torchtitan import golore_optimizer_config

STEPS, INTERVAL, D, H, VOCAB, LAYERS, BATCH, SEQ = 8, 4, 16, 24, 32, 2, 4, 6
#: name: (method, optimizer, extra keys). GoLore@50% switches at step 4, the checkpoint: SVD bases before, random
#: after. update_proj_gap 3: refreshes at steps 0, 3, 6 (the resumed run starts mid-period).
RUNS = {
    "galore-adamw": ("galore", "SubspaceAdamW", {}),
    "golore50-adamw": ("golore@50", "SubspaceAdamW", {}),
    "golore50-sgd": ("golore@50", "SubspaceSGD", {"momentum": 0.9}),
}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x):
        scores = (self.wq(x) @ self.wk(x).transpose(-1, -2)) / D ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.wo(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ self.wv(x))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm = nn.RMSNorm(D)
        self.output = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for block in self.layers.values():
            x = block(x)
        return self.output(self.norm(x))


def build(world: int):
    """The model (weights from a seeded generator, the same on every rank), FSDP2-sharded when world > 1 or
    under torchrun."""
    model = Toy()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * 0.3)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def parts(model, run: str, folder: str):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    method, optimizer, extra = RUNS[run]
    config = golore_optimizer_config(method, total_steps=STEPS, lr=3e-2, rank=4, update_proj_gap=3,
                                     optimizer=optimizer, **extra)
    optimizers = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(
        optimizers=optimizers, training_steps=STEPS)
    checkpointer = CheckpointManager.Config(enable=True, folder=run, interval=INTERVAL, keep_latest_k=0,
                                            last_save_model_only=False).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers, states={},
        sd_adapter=None, base_folder=folder)
    return optimizers, schedulers, checkpointer


def train_step(model, optimizers, schedulers, step: int, rank: int, world: int) -> None:
    """One step on this rank's rows of the global batch of ``step`` (a pure function of the step)."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    rows = tokens[rank::world]
    loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    optimizers.step()
    schedulers.step()
    optimizers.zero_grad()


def full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def main(out: str) -> None:
    torchrun = "RANK" in os.environ
    if torchrun:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if torchrun else (0, 1)
    folder = os.path.join(out, f"world{world}")
    for run in RUNS:
        results = {}
        model = build(world)
        optimizers, schedulers, checkpointer = parts(model, run, folder)
        for step in range(1, STEPS + 1):
            train_step(model, optimizers, schedulers, step, rank, world)
            checkpointer.save(step, last_step=step == STEPS)
        results["straight"] = full(model)
        checkpointer.close()

        model = build(world)
        optimizers, schedulers, checkpointer = parts(model, run, folder)
        assert checkpointer.load(step=INTERVAL)
        for step in range(INTERVAL + 1, STEPS + 1):
            train_step(model, optimizers, schedulers, step, rank, world)
        results["resumed"] = full(model)
        checkpointer.close()

        for mode in ("state_dict_first", "unguarded"):
            model = build(world)
            optimizers, schedulers, _ = parts(model, run, os.path.join(folder, "unused"))
            if mode == "state_dict_first":
                optimizers.state_dict()
            else:
                from torchtitan.components.optimizer.utils import init_optim_state

                init_optim_state(optimizers.optimizers[0])
            for step in range(1, STEPS + 1):
                train_step(model, optimizers, schedulers, step, rank, world)
            results[mode] = full(model)
        torch.save(results, os.path.join(out, f"{run}-world{world}-rank{rank}.pt"))
    if torchrun:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
