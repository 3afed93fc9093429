"""Worker for tests/test_switching.py: ``torchrun --standalone --nproc-per-node 2 switching_ddp_worker.py OUT``.

Each rank trains the counterexample's matrix under DDP (gloo) with GoLore@auto, on its own noise (rank-seeded
signs); DDP all-reduces the gradients, and the optimizer decides its switch from the all-reduced gradient with
no communication of its own. Every rank writes its weight, refresh tests and switch log to ``OUT/rank{r}.pt``.
"""
import sys

import torch
import torch.distributed as dist
from torch import nn

from golore_lab import SubspaceSGD
from golore_lab.counterexample import Counterexample

torch.set_num_threads(1)


class Quadratic(nn.Module):
    """f(X) + ⟨noise, X⟩: its gradient is the counterexample's stochastic gradient with this ``noise``."""

    def __init__(self, problem: Counterexample) -> None:
        super().__init__()
        self.problem = problem
        self.weight = nn.Parameter(problem.x0.clone())

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.problem.f(self.weight) + (noise * self.weight).sum()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    problem = Counterexample()
    model = Quadratic(problem)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = SubspaceSGD(model.parameters(), lr=3e-3, rank=problem.r, update_proj_gap=10, proj_type="left",
                      switch_step="auto", seed=5)
    tests = []
    opt.register_refresh_hook(lambda _, r: tests.append((r.step, r.kind, r.test and r.test.signal,
                                                        r.test and r.test.random_signal)))
    stream = problem.noise_periods(torch.Generator().manual_seed(100 + rank), 10)  # the ranks' noise differs
    for t in range(1000):
        if t % 10 == 0:
            block = next(stream)
        ddp(problem.noise_matrix(block[t % 10])).backward()
        opt.step()
        opt.zero_grad()
    torch.save({"weight": model.weight.detach(), "tests": tests, "log": opt.switch_log()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
