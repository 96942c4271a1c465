"""``LinkShare``: sender processes on one host that share a bottleneck split it evenly, through files.

One process per GPU worker is how engines run, each with its own sessions and controllers; each controller
sees only its own goodput, so their split stays wherever their probes left it. Here every controller of a
share publishes, every sample, a small record (its goodput, its capacity estimate, whether it got all its
pacing allowed) as a file in a directory named after the share (``/dev/shm/kvwire-share/<name>``, one file
per controller, replaced atomically), and reads the others' fresh records (younger than ``ttl``). The link
is taken to be the largest capacity any of them measured (or their summed goodput, if larger), and is
water-filled: a controller that uses less than an even share (app-limited, or held by its own path) keeps
what it uses, the rest split the remainder evenly. ``LinkControl`` caps its pacing at that share while
others are active; alone (no fresh record besides its own) nothing changes.

Owns: the record format (JSON, bounded: a file over 4 KiB or unparsable is ignored), the directory, the
fair-share arithmetic (``fair_share``, pure). Must not know: sessions, the policy beyond "cap at this".
A share name is the network namespace and destination address by default (``share_name``);
``$KVWIRE_LINK_SHARE`` names a wider one (several destinations behind one egress) or turns it off (``off``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

SHARE_ENV = "KVWIRE_LINK_SHARE"
ROOT = "/dev/shm/kvwire-share"
_MAX_RECORD = 4096
_STALE = 60.0  # seconds after which another controller's record is removed
_ids = iter(range(1 << 62))
_ids_lock = threading.Lock()


@dataclass(frozen=True)
class Peer:
    """One controller's latest record. Rates in bytes/s."""

    goodput: float
    capacity: float | None
    wants_more: bool  # it got all its pacing allowed: it would use more
    at: float  # wall-clock time of the record


def fair_share(mine: Peer, others: Sequence[Peer]) -> float | None:
    """The aggregate pacing this controller may use: water-filling the link (the largest capacity any
    measured, or the summed goodput if larger) over everyone; controllers not asking for more keep their
    goodput. ``None``: nothing known (no capacity anywhere)."""
    everyone = [mine, *others]
    caps = [p.capacity for p in everyone if p.capacity]
    if not caps:
        return None
    link = max(max(caps), sum(p.goodput for p in everyone))
    satisfied = [p for p in others if not p.wants_more]
    hungry = len(everyone) - len(satisfied)
    left = link - sum(p.goodput for p in satisfied)
    # a satisfied one that uses more than the even share of what is left is hungry after all
    while True:
        even = left / max(1, hungry)
        over = [p for p in satisfied if p.goodput > even]
        if not over:
            return max(0.0, even)
        for p in over:
            satisfied.remove(p)
            left += p.goodput
            hungry += 1


def share_name(host: str) -> str | None:
    """The share a session to ``host`` joins: ``$KVWIRE_LINK_SHARE`` if set (``off``: none), else the
    destination's address (processes on this host sending to that host share the path)."""
    env = os.environ.get(SHARE_ENV)
    if env is not None:
        env = env.strip()
        return None if env.lower() in ("", "0", "off", "false", "no") else _safe(env)
    try:
        addr = socket.getaddrinfo(host, None)[0][4][0]
    except (OSError, IndexError):
        addr = host
    try:  # the same address from another network namespace (a container, a test's link) is another path
        ns = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        ns = 0
    return _safe(f"{ns}-{addr}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "default"


class LinkShare:
    """``share = LinkShare("10.0.0.7")``; ``share.publish(...)``; ``share.others()``; ``share.close()``."""

    def __init__(self, name: str, root: str = ROOT, ttl: float = 1.0) -> None:
        self.name = _safe(name)
        self.dir = os.path.join(root, self.name)
        self.ttl = ttl
        with _ids_lock:
            n = next(_ids)
        self.me = f"{os.getpid()}-{n}"
        self._path = os.path.join(self.dir, self.me + ".json")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def publish(self, peer: Peer) -> None:
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"g": peer.goodput, "c": peer.capacity, "w": peer.wants_more, "t": peer.at}, f)
            os.replace(tmp, self._path)
        except OSError:
            pass  # a full /dev/shm costs the sharing, never the transfer

    def others(self, now: float | None = None) -> list[Peer]:
        now = time.time() if now is None else now
        out: list[Peer] = []
        try:
            names = os.listdir(self.dir)
        except OSError:
            return out
        for n in names:
            path = os.path.join(self.dir, n)
            if n.endswith(".tmp"):  # a writer killed between write and rename leaves one: removed when stale
                try:
                    if now - os.stat(path).st_mtime > _STALE:
                        os.unlink(path)
                except OSError:
                    pass
                continue
            if not n.endswith(".json") or n == self.me + ".json":
                continue
            try:
                if now - os.stat(path).st_mtime > _STALE:  # a process that died without closing
                    os.unlink(path)
                    continue
                with open(path, "rb") as f:
                    raw = f.read(_MAX_RECORD + 1)
                if len(raw) > _MAX_RECORD:
                    continue
                d = json.loads(raw)
                p = Peer(float(d["g"]), None if d["c"] is None else float(d["c"]), bool(d["w"]), float(d["t"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if 0 <= now - p.at <= self.ttl and p.goodput >= 0:
                out.append(p)
        return out

    def close(self) -> None:
        for path in (self._path, self._path + ".tmp"):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.rmdir(self.dir)  # the last one out (others' files keep it otherwise)
        except OSError:
            pass


__all__ = ["SHARE_ENV", "LinkShare", "Peer", "fair_share", "share_name"]
