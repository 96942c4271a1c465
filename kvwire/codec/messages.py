"""Typed reading of control message bodies other than the manifest (``manifest.py``) and the handshake.

Owns: the fields of DONE, CANCEL/ERROR, ACK/NACK and the transfer id every transfer message names,
each checked for its exact type and range, so a handler gets plain ints and strings or a
ProtocolError, never a TypeError from a list where an int belongs; and the other way, a reason as this
side puts it on the wire (``wire_reason``). Must not know: sockets, sessions or transfer state.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .transfer import State

_U64 = (1 << 64) - 1
MAX_REASON = 1024  # characters of a peer's reason kept (longer ones are cut)


def _u64(body: dict[str, Any], key: str, kind: str) -> int:
    v = body.get(key)
    if type(v) is not int or not 0 <= v <= _U64:
        raise ProtocolError(f"{kind}: field {key!r} must be an unsigned 64-bit int, got {type(v).__name__}")
    return v


def transfer_id(body: dict[str, Any], kind: str) -> int:
    """The ``tid`` a transfer message names."""
    return _u64(body, "tid", kind)


def reason(body: dict[str, Any]) -> str:
    """The peer's ``reason`` as text ('' when absent; a non-string is a protocol error)."""
    v = body.get("reason", "")
    if type(v) is not str:
        raise ProtocolError(f"field 'reason' must be a string, got {type(v).__name__}")
    return v[:MAX_REASON]


def wire_reason(text: str) -> str:
    """``text`` (a user's cancel reason, an allocator's exception) as a reason this side sends: its first
    ``MAX_REASON`` characters, with what UTF-8 cannot carry (a lone surrogate, as ``surrogateescape`` leaves
    in a file name) escaped. Sent whole, a 5 MiB one overran the peer's control frame bound and a surrogate
    failed the frame's encoding: either ended the session, every transfer on it with it."""
    cut = text[:MAX_REASON]
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_done(body: dict[str, Any]) -> tuple[int, int]:
    """DONE: ``(tid, digest)``."""
    return transfer_id(body, "done"), _u64(body, "digest", "done")


def parse_end(body: dict[str, Any], kind: str) -> tuple[int, State | None, str]:
    """CANCEL or ERROR naming a transfer: ``(tid, state the sender reports, or None, reason)``."""
    tid = transfer_id(body, kind)
    state = body.get("state")
    if state is not None and (type(state) is not str or state not in {s.value for s in State}):
        raise ProtocolError(f"{kind}: unknown state {state!r}"[:200])
    return tid, None if state is None else State(state), reason(body)


def parse_chunks(body: dict[str, Any], kind: str, num_chunks: int) -> list[int]:
    """ACK/NACK: the chunk indices, each inside the transfer's plan."""
    chunks = body.get("c")
    if type(chunks) is not list or not all(type(c) is int and 0 <= c < num_chunks for c in chunks):
        raise ProtocolError(f"{kind}: 'c' must be a list of chunk indices below {num_chunks}")
    return chunks
