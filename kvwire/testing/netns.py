"""Network-namespace plumbing for tests: create, run inside, enter from a thread, delete.

Owns: calls to ``ip`` (iproute2), ``setns(2)`` through ctypes (Python 3.11 has no ``os.setns``) to move
the *calling thread* into a namespace and back, and the checks that say why namespaces cannot be used
here (not root, tools missing). Must not know: links, emulation, kvwire transfers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import KvwireError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class NetnsError(KvwireError):
    """A namespace operation failed (the message carries the command and its stderr)."""


def unavailable_reason(tools: Sequence[str] = ("ip",)) -> str | None:
    """Why namespaces cannot be used here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def sh(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (no shell), capturing output; raise ``NetnsError`` on failure when ``check``."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(cmd)}: {e}") from e
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def exec_prefix(ns: str) -> list[str]:
    """Prefix that runs a command inside ``ns``."""
    return ["ip", "netns", "exec", ns]


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def create(ns: str) -> None:
    sh(["ip", "netns", "add", ns])
    sh(["ip", "-n", ns, "link", "set", "lo", "up"])


def delete(ns: str) -> None:
    if exists(ns):
        sh(["ip", "netns", "del", ns], check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(e)}")


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body with the *calling thread* inside ``ns``: sockets it creates live there (and keep
    working from any thread afterwards); threads it starts inherit the namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    except OSError as e:
        os.close(home)
        raise NetnsError(f"no namespace {ns!r}: {e}") from e
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def write_sysctl(ns: str, key: str, value: str) -> None:
    """``sysctl -w key=value`` inside ``ns`` (only per-namespace keys, such as ``net.ipv4.*``)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(ns):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise NetnsError(f"sysctl {key}={value} in {ns}: {e}") from e
