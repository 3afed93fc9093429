"""environment.yml installs what pyproject.toml declares; the README's quickstart is what CI runs."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    requirements = [line for line in pip_section if not line.startswith("-e")]
    assert sorted(requirements) == sorted(project["dependencies"])
    editable = [line for line in pip_section if line.startswith("-e")]
    assert editable == ["-e .[all]"]
    assert set(project["optional-dependencies"]["all"][0].split("[")[1].rstrip("]").split(",")) == (
        set(project["optional-dependencies"]) - {"all"})
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_readme_quickstart_is_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_training_loop_runs():
    """The README's example (GoLore@20% with the param-group helper) runs as written, shortened."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "switch_fraction=0.2, total_steps=T" in code and "T = 1000" in code
    namespace: dict = {}
    exec(code.replace("T = 1000", "T = 30"), namespace)  # noqa: S102
    opt, model = namespace["opt"], namespace["model"]
    subspace = [g for g in opt.param_groups if g.get("rank") is not None]
    assert [p for g in subspace for p in g["params"]] == [model["mlp"].weight]
    assert opt.state[model["mlp"].weight]["step"] == 30
