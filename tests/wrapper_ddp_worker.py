"""Worker for tests/test_wrapper.py: ``torchrun --standalone --nproc-per-node 2 wrapper_ddp_worker.py OUT``.

Each rank trains the wrapped toy network under DDP (gloo) on its own half of every batch, through several SVD
and random refreshes; rank 0 also runs the optimizer path in one process on the whole batch. Every rank writes
its merged weights, the reference and the bytes its refreshes all-reduced to ``OUT/rank{r}.pt``.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from test_wrapper import Net, split_groups  # noqa: E402

from golore_lab import SubspaceAdamW  # noqa: E402
from golore_lab.wrapper import SubspaceModel  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = Net().double()
    reference = copy.deepcopy(base)
    cfg = dict(rank=3, update_proj_gap=3, scale=0.5)
    model = SubspaceModel(base, target_modules=["attn", "mlp"], switch_step=6, **cfg)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
    model.attach(opt)
    ref_opt = SubspaceAdamW(split_groups(reference, model, switch_step=6, **cfg), lr=0.05, weight_decay=0.1)
    sent = 0
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(8 * world, 5, generator=g, dtype=torch.float64)
        y = torch.randn(8 * world, 3, generator=g, dtype=torch.float64)
        mine = slice(8 * rank, 8 * (rank + 1))
        if model.refresh_due() and not model.refresh_needs_gradient():
            sent += model.refresh(opt)             # GoLore refreshes (steps 6, 9) before the forward: 0 bytes
        ((ddp(x[mine]) - y[mine]) ** 2).mean().backward()
        if model.refresh_due():
            sent += model.refresh(opt)
        opt.step()
        opt.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.save({"merged": model.merged_state_dict(), "reference": reference.state_dict(), "sent": sent,
                "steps": [layer.step for layer in model.layers.values()],
                "ddp_buffers": sorted(ddp.named_module_buffers)}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
