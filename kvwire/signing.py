"""Signed HTTP requests under a pre-shared key: the ``X-Kvwire-Auth`` scheme, and the nonces that stop replays.

Owns: the header value ``<ts> <nonce> <head-mac> <body-mac>``, HMAC-SHA256s in a caller's domain (``Scheme``):
the head MAC covers method, target, wall-clock time, a random nonce and the body's length, so a server checks
it before it reads a body byte; the body MAC covers the head MAC and the body. ``Nonces`` accepts each nonce
once while its time is within ``WINDOW`` s of this host's clock. ``body_seconds``: how long a server lets a
signed body take to arrive in all (a key holder, or a broken peer, dribbling one holds the server that long at
most). Used by the SGLang bootstrap mailbox
(``adapters.sglang_bootstrap``) and the PrfaaS control API (``prfaas.controlauth``), each in its own domain so a
signature for one is never valid for the other.
Must not know: HTTP servers or clients, routes, what a body means.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["AUTH", "BODY_RATE", "BODY_TIMEOUT", "MAX_NONCES", "WINDOW", "Nonces", "Scheme", "Signature",
           "body_seconds"]

AUTH = "X-Kvwire-Auth"
WINDOW = 120.0  # s a signed request's time may differ from this host's clock (and its nonce is remembered)
MAX_NONCES = 1 << 20  # nonces remembered (2 * WINDOW s of requests); beyond it, requests wait (503)
#: a signed body's whole read must end within BODY_TIMEOUT + its length / BODY_RATE s (a 16 MiB body: 21 s, at
#: 1 MiB/s; a message of a few KB: 5 s). The largest legitimate bodies (a long prompt's token ids, ~10 MB) cross
#: loopback in milliseconds and a 100 Mbit/s path in under a second.
BODY_TIMEOUT = 5.0
BODY_RATE = 1 << 20  # bytes/s: the slowest a signed body may arrive on average


def body_seconds(length: int) -> float:
    """Seconds a signed body of ``length`` bytes may take to arrive, in all."""
    return BODY_TIMEOUT + length / BODY_RATE


@dataclass(frozen=True)
class Signature:
    """A parsed ``X-Kvwire-Auth`` value."""

    ts: str
    nonce: str
    head: bytes
    body: bytes


@dataclass(frozen=True)
class Scheme:
    """The MACs of one domain (e.g. ``b"kvwire-sglang-mailbox/1 "``)."""

    domain: bytes

    def head_mac(self, key: bytes, method: str, target: str, ts: str, nonce: str, length: int) -> bytes:
        """The MAC of a request's head: what it asks (method, target), when, once (nonce), and how much."""
        return hmac.new(key, self.domain + f"head\n{method}\n{target}\n{ts}\n{nonce}\n{length}".encode(),
                        hashlib.sha256).digest()

    def body_mac(self, key: bytes, head: bytes, body: bytes) -> bytes:
        return hmac.new(key, self.domain + b"body\n" + head + body, hashlib.sha256).digest()

    def sign(self, key: bytes, method: str, target: str, body: bytes, now: float | None = None) -> str:
        """The ``X-Kvwire-Auth`` value for one request."""
        ts = f"{time.time() if now is None else now:.3f}"
        nonce = os.urandom(16).hex()
        head = self.head_mac(key, method, target, ts, nonce, len(body))
        return f"{ts} {nonce} {head.hex()} {self.body_mac(key, head, body).hex()}"

    @staticmethod
    def parse(value: str) -> Signature:
        """The header's four fields; ``ValueError`` when malformed."""
        ts, nonce, head_hex, body_hex = value.split(" ")
        return Signature(ts, nonce, bytes.fromhex(head_hex), bytes.fromhex(body_hex))

    def head_ok(self, key: bytes, sig: Signature, method: str, target: str, length: int) -> bool:
        return length >= 0 and hmac.compare_digest(sig.head, self.head_mac(key, method, target, sig.ts, sig.nonce,
                                                                            length))

    def body_ok(self, key: bytes, sig: Signature, body: bytes) -> bool:
        return hmac.compare_digest(sig.body, self.body_mac(key, sig.head, body))


class Nonces:
    """The nonces of the signed requests of the last ``2 * window`` s: each is accepted once."""

    def __init__(self, window: float = WINDOW, max_nonces: int = MAX_NONCES) -> None:
        self.window = window
        self.max_nonces = max_nonces
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def check(self, ts: str, nonce: str, now: float | None = None) -> str | None:
        """Why a request signed at ``ts`` with ``nonce`` is refused, or ``None`` (the nonce is now spent)."""
        now = time.time() if now is None else now
        try:
            t = float(ts)
        except ValueError:
            return "malformed time"
        if not abs(now - t) <= self.window:  # NaN too
            return f"time {ts} is more than {self.window:g} s off"
        with self._lock:
            while self._order and self._order[0][0] < now:  # its time is out of the window by now
                self._seen.discard(self._order.popleft()[1])
            if nonce in self._seen:
                return "replayed nonce"
            if len(self._seen) >= self.max_nonces:
                return "busy"
            self._seen.add(nonce)
            self._order.append((now + 2 * self.window, nonce))
        return None
