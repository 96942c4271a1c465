"""Argument checks shared by the public constructors and calls of the transport (``Session``/``connect``,
``Receiver``) and of the layers beside and above it (``cuda``'s staging, ``congestion``'s lane group, the
adapters, metrics): a bad value fails at the call with a ``TypeError`` or ``ValueError`` that names the
parameter, before a socket or thread is opened, instead of deep in a socket call, an hmac or a busy loop.
Here, not in ``tcp``, so that a layer ``tcp`` imports (``congestion``) can use it too.

Owns: the checks of hosts, ports, keys, flags, durations, waits' timeouts, bounded counts, callables, limits, chunk
stages and cancel reasons. Must not know anything else.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from .codec.frames import Limits


def check_host(host: object, name: str = "host") -> str:
    """A non-empty address or name (a ``str``)."""
    if not isinstance(host, str):
        raise TypeError(f"{name} must be a str (an address or name), not {type(host).__name__}")
    if not host:
        raise ValueError(f"{name} must not be empty")
    return host


def check_port(port: object, lo: int = 0, name: str = "port") -> int:
    """An ``int`` (``bool`` is not one) in ``lo..65535``: the socket layer would wrap 70000 to 4464."""
    if isinstance(port, bool) or not isinstance(port, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    n = int(port)
    if not lo <= n <= 65535:
        raise ValueError(f"{name} must be in {lo}..65535, got {n}")
    return n


def check_key(key: object) -> bytes:
    """The pre-shared key as bytes: ``bytes``, ``bytearray`` or ``str`` (UTF-8), ``None`` or empty for none."""
    if key is None:
        return b""
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    raise TypeError(f"key must be bytes, bytearray, str or None, not {type(key).__name__}")


def check_seconds(name: str, value: object, *, none_ok: bool = False) -> float:
    """A positive, finite number of seconds. Zero would spin a loop that waits this long between its
    turns, and infinity or NaN wait forever. (``none_ok``: only names ``None`` in the message.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds{' or None' if none_ok else ''}, "
                        f"not {type(value).__name__}")
    x = float(value)
    if not 0 < x < math.inf:  # (NaN fails both)
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return x


def check_timeout(name: str, value: object) -> float | None:
    """``None`` (the default applies) or a positive, finite number of seconds."""
    return None if value is None else check_seconds(name, value, none_ok=True)


def check_wait(name: str, value: object, *, none_ok: bool = False) -> float:
    """The longest a call may wait: a finite number of seconds >= 0 (0: not at all). Infinity is refused as
    by ``check_seconds``: where a call may wait without a deadline, ``None`` says so (``none_ok``: only
    names it in the messages; the caller handles it). NaN never compares, so a wait bounded by it never
    ends."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds{' or None' if none_ok else ''}, "
                        f"not {type(value).__name__}")
    x = float(value)
    if not 0 <= x < math.inf:  # (NaN fails both)
        raise ValueError(f"{name} must be a finite number of seconds >= 0"
                         f"{' (None: no deadline)' if none_ok else ''}, got {value!r}")
    return x


def check_wait_timeout(name: str, value: object) -> float | None:
    """A public wait's ``timeout`` (``result``, ``wait_layer``, ``layers``, ``next_transfer``): ``None`` waits
    without a deadline; a number <= 0 does not wait (callers pass ``deadline - now``: 0 then); NaN and
    infinity are refused as by ``check_wait`` (before, NaN and infinity, like a str, failed deep in a lock's
    wait with an error that named nothing the caller passed)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value < 0:  # (NaN is not < 0)
        value = 0.0
    return check_wait(name, value, none_ok=True)


def check_flag(name: str, value: object, *, none_ok: bool = False) -> bool | None:
    """A ``bool`` (``None`` too where ``none_ok``: the default applies). Anything else would be taken by its
    truth value: ``'no'`` and ``'false'`` as True."""
    if isinstance(value, bool) or (value is None and none_ok):
        return value
    raise TypeError(f"{name} must be True or False{' or None' if none_ok else ''}, not {type(value).__name__}")


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """An ``int`` (numpy's too; ``bool``, ``float`` and ``str`` are not) in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        raise ValueError(f"{name} must be {f'in {lo}..{hi}' if hi is not None else f'>= {lo}'}, got {n}")
    return n


def check_callable(name: str, fn: object, *, none_ok: bool = True) -> Callable[..., Any] | None:
    """A callable (or ``None`` where ``none_ok``): one that is not would fail on a protocol thread later."""
    if fn is None and none_ok:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be callable{' or None' if none_ok else ''}, not {type(fn).__name__}")
    return fn


def check_reason(reason: object) -> str:
    """A cancel reason: a ``str`` (it goes to the peer, which takes nothing else; an int sent there failed the
    whole session, every other transfer on it with it)."""
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    return reason


def check_limits(limits: object) -> Limits:
    """A ``kvwire.codec.frames.Limits``: anything else failed on the first connection's thread (a receiver's
    accepted none, silently)."""
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a kvwire.codec.frames.Limits, not {type(limits).__name__}")
    return limits


def check_stage(stage: object) -> None:
    """A ``transport.ChunkStage``: callable ``outgoing`` and ``incoming`` (one without failed every transfer,
    chunk by chunk)."""
    if not all(callable(getattr(stage, m, None)) for m in ("outgoing", "incoming")):
        raise TypeError(f"chunk_stage must have outgoing() and incoming() (a ChunkStage), not {type(stage).__name__}")
