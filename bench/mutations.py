"""Mutation check of the optimizer core: does the test suite notice when the algorithm is deliberately broken?

    python bench/mutations.py [--tests-rev REV] [--jobs 2] [--only NAME ...] [--json PATH]

Each mutant is one small source edit of ``golore_lab/projection.py``, ``rules.py`` or ``optim/`` (and a few of
``spec.py`` and ``wrapper.py``) that a plausible bug would make: the Haar sampler without its sign fix, the momentum
carried with Oᵀ instead of O, weight decay coupled instead of decoupled, the switch one step late, ... For each one,
the package is copied to a temporary folder, the edit applied there (the working tree is never touched), and
``pytest -x -q`` runs the core's test files (``tests/test_optim.py``, ``tests/test_spec.py``,
``tests/test_wrapper.py``) against the copy, two mutants at a time. A mutant is *caught* when a test fails; the
table names the first failing test. Tests that already fail on the unmutated package are reported and deselected,
so they cannot count as catches.

``--tests-rev REV`` takes the test files from git revision ``REV`` instead of the working tree (files it lacks are
skipped): run with the revision before a test change to see which mutants the old suite let through. A mutation
whose text no longer occurs in the source (the code moved on) is reported as ``stale``, one that does not compile
as ``invalid``, never as caught; the exit status is 1 unless every mutant is caught.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from golore_lab.fileio import atomic_write_text  # noqa: E402

TEST_FILES = ("tests/test_optim.py", "tests/test_spec.py", "tests/test_wrapper.py")
# checks that the mutants below still apply to the source: it would "catch" every one of them
NOT_A_CATCH = ("tests/test_optim.py::test_mutation_check_is_current",)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str      # relative to golore_lab/
    old: str       # must occur exactly once
    new: str
    bug: str       # what the edit does, in words


MUTANTS = [
    # ---------------------------------------------------------------- projection.py
    Mutant("haar-no-sign-fix", "projection.py", "    return q * signs.unsqueeze(-2)", "    return q",
           "Haar sampler without the sign fix of diag(R)"),
    Mutant("haar-uniform-entries", "projection.py", "z = torch.randn(dim, rank,", "z = torch.rand(dim, rank,",
           "random basis from uniform instead of Gaussian entries"),
    Mutant("svd-bottom-vectors", "projection.py", "basis = U[..., :rank] if side", "basis = U[..., -rank:] if side",
           "GaLore keeps the last r left singular vectors"),
    Mutant("std-side-swapped", "projection.py", 'return "right" if m >= n else "left"',
           'return "left" if m >= n else "right"', 'proj_type="std" projects the larger side'),
    Mutant("seed-ignores-step", "projection.py", "    x = _splitmix64(x ^ (step & _MASK64))\n", "",
           "random bases derived without the step: every refresh draws the same basis"),
    Mutant("seed-ignores-position", "projection.py", "    x = _splitmix64(x ^ (index & _MASK64))\n", "",
           "random bases derived without the parameter position: equal shapes share a basis"),
    Mutant("transport-transposed", "projection.py", "return new.T @ old if side", "return old.T @ new if side",
           "state carried by Oᵀ = P_oldᵀ P_new (left side)"),
    # ---------------------------------------------------------------- rules.py
    Mutant("momentum-carried-with-OT", "rules.py", "return transport @ state if side",
           "return transport.T @ state if side", "first moment carried with Oᵀ instead of O"),
    Mutant("second-moment-with-O", "rules.py", "squared = transport * transport", "squared = transport",
           "second moment carried with O instead of O∘O"),
    Mutant("bias-correction-off-by-one", "rules.py", "1 - beta2**count", "1 - beta2**(count + 1)",
           "second-moment bias correction one step ahead"),
    Mutant("eps-before-bias-correction", "rules.py", "exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**count)).add_(eps)",
           "exp_avg_sq.sqrt().add_(eps).div_(math.sqrt(1 - beta2**count))", "ε added before the bias correction"),
    Mutant("beta1-swapped", "rules.py", "exp_avg.lerp_(grad, 1 - beta1)", "exp_avg.lerp_(grad, beta1)",
           "first moment weighted β₁ R instead of (1 − β₁) R"),
    Mutant("nesterov-sign", "rules.py", "alpha=momentum) if nesterov", "alpha=-momentum) if nesterov",
           "Nesterov look-ahead with the wrong sign"),
    Mutant("dampening-ignored", "rules.py", "add_(grad, alpha=1 - dampening)", "add_(grad)",
           "SGD dampening ignored"),
    Mutant("reset-zeroes-sgd-buffer", "rules.py", 'state.pop("momentum_buffer", None)',
           'state["momentum_buffer"].zero_() if "momentum_buffer" in state else None',
           '"reset" zeroes the SGD buffer instead of restarting it from R'),
    # ---------------------------------------------------------------- optim/
    Mutant("weight-decay-coupled", "optim/adamw.py",
           '        return grad\n\n    @staticmethod\n    def decay(group: dict[str, Any], p: Tensor, lr: float | Tensor) -> None:\n'
           '        if group["weight_decay"]:\n            p.mul_(1 - lr * group["weight_decay"])',
           '        return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad\n\n'
           '    @staticmethod\n    def decay(group: dict[str, Any], p: Tensor, lr: float | Tensor) -> None:\n'
           '        pass',
           "AdamW's weight decay coupled (L2 in the gradient) instead of decoupled"),
    Mutant("sgd-weight-decay-dropped", "optim/sgd.py",
           'return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad', "return grad",
           "SGD's weight decay ignored"),
    Mutant("scale-applied-twice", "optim/functional.py",
           '  # (r, n) or (m, r)\n    alpha = -group["scale"] * factor\n',
           '  # (r, n) or (m, r)\n    alpha = -group["scale"] ** 2 * factor\n', "scale α applied twice"),
    Mutant("refresh-phase", "optim/records.py", 'self.count % self.group["update_proj_gap"] == 0',
           'self.count % self.group["update_proj_gap"] == 1', "refresh at count % gap == 1"),
    Mutant("refresh-due-phase", "optim/base.py", 'if not state or state["step"] % group["update_proj_gap"] == 0:',
           'if not state or state["step"] % group["update_proj_gap"] == 1:', "refresh_due() one step late"),
    Mutant("switch-off-by-one", "optim/bases.py", "if random or (spec.is_int(switch) and count >= switch):",
           "if random or (spec.is_int(switch) and count > switch):", "switch_step compared with > instead of >="),
    Mutant("finite-check-skipped", "optim/finite.py", "        if not tensors:\n            return",
           "        if True:\n            return", "non-finite gradients not checked"),
    Mutant("reset-keeps-bias-correction", "optim/functional.py",
           'state["moment_start"] = count  # the bias correction restarts with the moments', "pass",
           '"reset" does not restart the bias correction'),
    Mutant("projector-unchecked", "optim/bases.py", 'if kind == "custom":\n        check_basis',
           'if False:\n        check_basis', "a user projector's result is not checked"),
    Mutant("load-state-shapes-unchecked", "optim/checkpoint.py",
           "self._check_param_state(state, checked, p, self._param_name(live, index, i))", "pass",
           "load_state_dict does not check state shapes"),
    Mutant("load-settings-unchecked", "optim/checkpoint.py", "if mine != theirs and not keep_settings:", "if False:",
           "load_state_dict lets saved subspace settings win silently"),
    # ---------------------------------------------------------------- spec.py, wrapper.py
    Mutant("bool-is-int", "spec.py",
           "return isinstance(value, numbers.Integral) and not isinstance(value, bool)",
           "return isinstance(value, numbers.Integral)", "True accepted as an integer setting"),
    Mutant("switch-fraction-reversed", "spec.py", "random_fraction=fraction)", "random_fraction=1 - fraction)",
           "switch_fraction read as the SVD share"),
    Mutant("wrapper-projector-unchecked", "wrapper.py", 'if kind == "custom":\n            dim = layer.weight',
           'if False:\n            dim = layer.weight', "the wrapper does not check a user projector's result"),
    Mutant("wrapper-reset-keeps-adam-step", "wrapper.py", '            state["step"].zero_()', "            pass",
           '"reset" in the wrapper does not restart torch Adam\'s bias correction'),
]


@dataclass
class Result:
    name: str
    file: str
    bug: str
    status: str            # "caught", "NOT caught", "stale" (text not found), "invalid" (does not compile)
    by: str                # first failing test, or what went wrong
    seconds: float


def test_tree(rev: str | None) -> dict[str, bytes]:
    """The files of ``tests/`` (relative paths -> bytes), from the working tree or from git revision ``rev``."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_bytes() for p in (ROOT / "tests").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "tests"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def build(folder: Path, tests: dict[str, bytes], mutant: Mutant | None) -> None:
    """The package (mutated when ``mutant``), pyproject.toml and the test files, in ``folder``."""
    shutil.copytree(ROOT / "golore_lab", folder / "golore_lab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    for name, data in tests.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if mutant is not None:
        path = folder / "golore_lab" / mutant.file
        path.write_text(path.read_text().replace(mutant.old, mutant.new))


def pytest(folder: Path, files: list[str], extra: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
               *(f"--deselect={test}" for test in NOT_A_CATCH), *extra, *files]
    try:
        run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return run.returncode, run.stdout + run.stderr


def failures(output: str) -> list[str]:
    """The test ids of pytest's short summary (``FAILED tests/x.py::test_y[a b] - message``)."""
    return [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def check(mutant: Mutant, tests: dict[str, bytes], files: list[str], deselect: list[str], timeout: float) -> Result:
    source = (ROOT / "golore_lab" / mutant.file).read_text()
    if source.count(mutant.old) != 1:
        return Result(mutant.name, mutant.file, mutant.bug, "stale",
                      f"text occurs {source.count(mutant.old)} times in {mutant.file}", 0.0)
    try:
        compile(source.replace(mutant.old, mutant.new), mutant.file, "exec")
    except SyntaxError as error:  # a mutant that does not even import would be "caught" by every test
        return Result(mutant.name, mutant.file, mutant.bug, "invalid", f"SyntaxError: {error}", 0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        build(Path(tmp), tests, mutant)
        code, output = pytest(Path(tmp), files, ["-x", *(f"--deselect={d}" for d in deselect)], timeout)
    seconds = time.perf_counter() - start
    if code == 0:
        return Result(mutant.name, mutant.file, mutant.bug, "NOT caught", "", seconds)
    failed = failures(output)
    by = failed[0] if failed else ("timeout" if code == -1 else f"pytest exit {code}")
    return Result(mutant.name, mutant.file, mutant.bug, "caught", by, seconds)


def table(results: list[Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'mutant':<{width}}  {'file':<13} {'result':<10}  caught by / bug"]
    for r in results:
        detail = r.by.removeprefix("tests/") if r.status == "caught" else r.by or r.bug
        lines.append(f"{r.name:<{width}}  {r.file:<13} {r.status:<10}  {detail}")
    caught = sum(r.status == "caught" for r in results)
    lines.append(f"{caught} of {len(results)} mutants caught")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests-rev", default=None, help="take tests/ from this git revision (default: working tree)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (atomically)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    mutants = MUTANTS if args.only is None else [m for m in MUTANTS if m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}")

    tests = test_tree(args.tests_rev)
    files = [f for f in TEST_FILES if f in tests]
    print(f"tests: {', '.join(files)} from {args.tests_rev or 'the working tree'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        build(Path(tmp), tests, None)
        code, output = pytest(Path(tmp), files, [], args.timeout)
    deselect = failures(output)
    if code not in (0, 1) or (code == 1 and not deselect):
        print(output[-3000:])
        print(f"the unmutated suite did not run (pytest exit {code})")
        return 2
    if deselect:
        print(f"failing before any mutation, deselected: {', '.join(deselect)}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda m: check(m, tests, files, deselect, args.timeout), mutants))
    print(table(results))
    print(f"({time.perf_counter() - start:.0f} s with {args.jobs} at a time)")
    if args.json is not None:
        payload = {"tests_rev": args.tests_rev, "test_files": files, "deselected": deselect,
                   "results": [asdict(r) for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return 0 if all(r.status == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
