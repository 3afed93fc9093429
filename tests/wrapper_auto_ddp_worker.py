"""Worker for tests/test_wrapper_auto.py: ``torchrun --standalone --nproc-per-node 2 wrapper_auto_ddp_worker.py OUT``.

Each rank trains the wrapped counterexample (test_wrapper_auto.Quadratic) with GoLore@auto under DDP (gloo), on its
own noise; DDP averages the factor's and the probe factor's gradients, and each rank decides its switch alone.
Rank 0 also runs the optimizer path in one process on the mean of the ranks' noise. Every rank writes its weight,
its refresh tests and its switch log (and rank 0 the reference's) to ``OUT/rank{r}.pt``.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from test_wrapper_auto import make_pair, signs  # noqa: E402

from golore_lab import switching  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt, reference, ref_opt = make_pair("sgd", "left", 1e-2, gap=10, seed=5)
    ddp = nn.parallel.DistributedDataParallel(model)
    layer = model.layers["lin"]
    generators = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    tests = []
    for _ in range(300):
        noise = [signs(g, 1)[0] for g in generators]                # every rank's noise; each trains on its own
        if model.refresh_due() and not switching.switched(layer.auto_state):
            test = switching.decide(layer.auto_state, layer.rank)
            tests.append(None if test is None else (test.signal, test.random_signal, test.t, test.switch))
        if model.refresh_due() and not model.refresh_needs_gradient():
            model.refresh(opt)
        ddp(noise[rank]).backward()
        if model.refresh_due():
            model.refresh(opt)
        opt.step()
        opt.zero_grad()
        if rank == 0:
            reference(sum(noise) / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    torch.save({"weight": model.merged_state_dict()["lin.weight"], "tests": tests, "log": model.switch_log(),
                "reference": reference.lin.weight.detach(), "ref_log": ref_opt.switch_log()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
