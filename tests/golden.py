"""The fixed small runs of ``tests/test_golden.py``, and the script that (re)writes their golden files.

    .venv/bin/python tests/golden.py          # rewrite tests/data/golden/*.pt from the current code

Each case trains four matrices (three of one shape, so that ``foreach`` stacks them, and one of another) and a
bias with one rule (AdamW or momentum SGD), one method (GaLore ``svd``, GoLore ``random``, GoLore@x% ``switch``,
GoLore@auto ``auto``) and one path (``per-tensor`` or ``foreach``) for :data:`STEPS` steps on gradients drawn
from a seeded generator, saving the parameters and the state dict after :data:`HALF` steps and the parameters
after :data:`STEPS`. The gradients' noise dominates the SVD's subspace; in the GoLore@auto cases the signal outside
it is :data:`AUTO_SIGNAL` times stronger (still below the noise the SVD picks), so that the test switches the SGD
runs within the run. The other files were written by the optimizer before its split into ``golore_lab/optim/``;
the GoLore@auto files were rewritten when its test became disjoint pairs with a fresh probe per pair (a
period that the previous test saved mid-way is refused on load, ``tests/test_switching.py``).
"""
from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
HALF, STEPS = 15, 30
SHAPES = [(8, 6), (8, 6), (8, 6), (5, 9)]
RULES = ("adamw", "sgd")
METHODS = {"svd": {}, "random": {"projection": "random"}, "switch": {"switch_step": 10}, "auto": {"switch_step": "auto"}}
PATHS = {"per-tensor": False, "foreach": True}
#: the signal's factor in the GoLore@auto cases (1 elsewhere): enough evidence for the test's four pairs a period
AUTO_SIGNAL = 2.0
CASES = [f"{rule}-{method}-{path}" for rule, method, path in itertools.product(RULES, METHODS, PATHS)]


def make(case: str, params=None):
    """The parameters (fresh, or ``params``) and the optimizer of ``case``."""
    from golore_lab import SubspaceAdamW, SubspaceSGD

    rule, method, path = case.split("-", 2)
    if params is None:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES] + [
            torch.nn.Parameter(torch.randn(5, generator=g))]
    group = {"params": params[:-1], "rank": 2, "update_proj_gap": 10, "foreach": PATHS[path], **METHODS[method]}
    rest = {"params": params[-1:], "foreach": PATHS[path]}
    if rule == "adamw":
        opt = SubspaceAdamW([group, rest], lr=0.01, weight_decay=0.1, seed=3)
    else:
        opt = SubspaceSGD([group, rest], lr=0.01, momentum=0.9, weight_decay=0.1, seed=3)
    return params, opt


def signal_of(case: str) -> float:
    """The signal's factor of ``case`` in :func:`gradient`."""
    return AUTO_SIGNAL if "-auto-" in case else 1.0


def gradient(p: torch.Tensor, step: int, index: int, signal: float = 1.0) -> torch.Tensor:
    """Gaussian noise drawn from (step, index); for a matrix, the signal W on all but the last two coordinates of
    its smaller side (the projected one) and strong noise (3×) on those two, where the SVD then looks."""
    g = torch.Generator().manual_seed(1000 * step + index)
    noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
    if p.dim() == 1:
        return 0.1 * p.detach() + noise
    mask = torch.zeros(p.shape, dtype=p.dtype)
    if p.shape[0] >= p.shape[1]:
        mask[:, -2:] = 1
    else:
        mask[-2:, :] = 1
    return signal * (1 - mask) * p.detach() + 3 * mask * noise + 0.1 * noise


def advance(params, opt, start: int, stop: int, signal: float = 1.0) -> None:
    for step in range(start, stop):
        for index, p in enumerate(params):
            p.grad = gradient(p, step, index, signal)
        opt.step()


def run(case: str) -> dict:
    """The case's record: parameters and state dict at :data:`HALF`, parameters at :data:`STEPS`."""
    params, opt = make(case)
    advance(params, opt, 0, HALF, signal_of(case))
    half = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    advance(params, opt, HALF, STEPS, signal_of(case))
    return {"half": half, "state_dict": state, "final": [p.detach().clone() for p in params],
            "switch_log": [(r["position"], r["step"]) for r in opt.switch_log()]}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        record = run(case)
        torch.save(record, GOLDEN / f"{case}.pt")
        print(case, "switches:", record["switch_log"])


if __name__ == "__main__":
    main()
