"""The tests' network guard: a socket may connect to the loopback (and AF_UNIX paths) only.

The test session installs it in its own process (``tests/conftest.py``) and puts this folder on ``PYTHONPATH``
so that every Python child process the tests spawn imports it at start-up as ``sitecustomize`` and installs it
too (when ``GOLORE_LAB_NETWORK_GUARD=1``). :func:`install` wraps ``socket.socket.connect``, ``connect_ex`` and
``sendto``: an address outside 127.0.0.0/8, ``::1`` (or their IPv4-mapped form) and ``localhost`` raises
:class:`NetworkAccessError` and is appended, one line per attempt, to the file named by
``$GOLORE_LAB_NETWORK_GUARD_LOG`` (shared by the test process and its children, so that the test session can
fail a test whose code, or whose child process, caught the error and carried on). It covers what Python code does; sockets opened
by C/C++ code (torch's gloo and TCPStore, which only talk to localhost here) are not seen.
"""
from __future__ import annotations

import ipaddress
import os
import socket

LOG_VARIABLE = "GOLORE_LAB_NETWORK_GUARD_LOG"


class NetworkAccessError(RuntimeError):
    """A test tried to reach the network (deliberately not an OSError, so that retry/fallback code won't hide it)."""


def is_loopback(family: int, address) -> bool:
    """True for AF_UNIX and for IPv4/IPv6 addresses (or ``localhost``) of the loopback."""
    if family == getattr(socket, "AF_UNIX", object()):
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0]
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _record(message: str) -> None:
    path = os.environ.get(LOG_VARIABLE)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"pid {os.getpid()}: {message}\n")


def _guarded(name: str, original):
    def method(self, *args):
        target = args[-1] if name == "sendto" else args[0]  # connect(address), sendto(data[, flags], address)
        if not is_loopback(self.family, target):
            message = f"network access blocked by the test guard: socket.{name} to {target!r}"
            _record(message)
            raise NetworkAccessError(f"{message} (tests may only reach the loopback)")
        return original(self, *args)

    method.__name__ = name
    method.__wrapped__ = original
    return method


def install() -> None:
    """Guard ``socket.socket`` in this process (idempotent)."""
    for name in ("connect", "connect_ex", "sendto"):
        original = getattr(socket.socket, name)
        if not hasattr(original, "__wrapped__"):
            setattr(socket.socket, name, _guarded(name, original))


if os.environ.get("GOLORE_LAB_NETWORK_GUARD") == "1":
    install()
