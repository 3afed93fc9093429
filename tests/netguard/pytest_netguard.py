"""pytest plugin: no test reaches the network (see ``sitecustomize.py`` in this folder for the socket guard).

At configure time it installs the guard in the test process and prepares the environment every child process
inherits:

* ``PYTHONPATH`` starts with this folder and ``GOLORE_LAB_NETWORK_GUARD=1``: a Python child imports
  ``sitecustomize`` from here and guards its own sockets;
* ``PIP_NO_INDEX=1``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: pip and the Hugging Face libraries do not
  try the network at all;
* ``HTTP(S)_PROXY``/``ALL_PROXY`` point at a closed loopback port (``NO_PROXY`` keeps the loopback direct), so a
  non-Python child that honours proxies (curl, wget, git) fails fast instead of reaching out.

Limits: a non-Python child that ignores proxy variables, and sockets opened by C/C++ code, are not guarded; DNS
look-ups are not blocked (only the connection that follows them).

Each test phase (setup, call, teardown) that caused a blocked attempt -- in this process or in a child, caught
or not -- fails with the attempts listed.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("golore_lab_network_guard", HERE / "sitecustomize.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)

CHILD_ENVIRONMENT = {
    "GOLORE_LAB_NETWORK_GUARD": "1",
    "PIP_NO_INDEX": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "all_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
}
_log: Path | None = None


def pytest_configure(config):
    global _log
    if not os.environ.get(guard.LOG_VARIABLE):
        handle, name = tempfile.mkstemp(prefix="golore_lab-network-", suffix=".log")
        os.close(handle)
        os.environ[guard.LOG_VARIABLE] = name
    _log = Path(os.environ[guard.LOG_VARIABLE])
    os.environ.update(CHILD_ENVIRONMENT)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(HERE) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in paths if p])
    guard.install()


def _attempts() -> list[str]:
    return _log.read_text(encoding="utf-8").splitlines() if _log is not None and _log.exists() else []


def _guarded_phase():
    before = len(_attempts())
    outcome = yield
    new = _attempts()[before:]
    if new:
        pytest.fail("the test tried to reach the network:\n" + "\n".join(new), pytrace=False)
    return outcome


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded_phase())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded_phase())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _guarded_phase())
