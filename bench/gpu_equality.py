"""On a CUDA GPU: the batched path (``foreach=True``) follows the per-tensor path, and a tensor lr follows a float.

    python bench/gpu_equality.py          # seconds; exits 0 with a message without a GPU

The CPU tests (tests/test_batched.py) check the same on the CPU; this script repeats it where the batched path
is the default (CUDA: batched SVD / QR from cuSOLVER, foreach kernels). SVD and random (GoLore) projections,
AdamW and SGD, 4 equal-shape matrices plus one of another shape, 30 steps with 6 refreshes, float32. Prints
the largest parameter difference relative to the largest parameter change, per configuration.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab import SubspaceAdamW, SubspaceSGD  # noqa: E402


def run(cls, projection: str, foreach: bool, tensor_lr: bool, steps: int = 30) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(96, 64)] * 4 + [(64, 160)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    lr = torch.tensor(1e-2, device="cuda") if tensor_lr else 1e-2
    opt = cls([{"params": params, "rank": 8, "update_proj_gap": 5}], lr=lr, projection=projection, foreach=foreach)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=g)
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check (the CPU tests cover the same on the CPU)")
        return 0
    results = {}
    for cls in (SubspaceAdamW, SubspaceSGD):
        for projection in ("svd", "random"):
            reference = run(cls, projection, foreach=False, tensor_lr=False)
            start = run(cls, projection, foreach=False, tensor_lr=False, steps=0)
            scale = max((r - s).abs().max().item() for r, s in zip(reference, start))
            for foreach, tensor_lr in ((True, False), (False, True), (True, True)):
                other = run(cls, projection, foreach, tensor_lr)
                diff = max((r - o).abs().max().item() for r, o in zip(reference, other))
                results[f"{cls.__name__} {projection} foreach={foreach} tensor_lr={tensor_lr}"] = diff / scale
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "max relative difference to the per-tensor path": results}, indent=1))
    worst = max(results.values())
    print(f"worst: {worst:.2e} ({'OK' if worst < 1e-4 else 'DIFFERENT'})")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
