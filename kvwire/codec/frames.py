"""The wire format: a fixed 48-byte header, data chunks and msgpack control messages.

Owns: header packing/validation, control message kinds and their bodies, and the limits that bound
every length read from the network. Must not know: sockets, threads, clocks, layouts or transfer state.
The incremental ``FrameDecoder`` (bytes in, frames out) that tests and fuzzers use lives in
``kvwire.testing.decoder``; its names here are deprecated aliases.

Header, little-endian, 48 bytes::

    magic "KVWR" | version u8 | kind u8 | flags u16 | transfer_id u64 | chunk u32 | layer u32 |
    offset u64 | length u32 | payload xxh3_64 u64 | header check u32 (xxh32 of the 44 bytes before)

A DATA frame is followed by ``length`` payload bytes (one chunk of one transfer's flat payload,
``offset`` from its start). A CONTROL frame is followed by ``length`` bytes of msgpack: a map whose
``"t"`` names the message. Nothing is ever pickled.
"""

from __future__ import annotations

import importlib
import struct
import warnings
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

from ..errors import ProtocolError

MAGIC = b"KVWR"
VERSION = 2  # 2: lane proofs answer a per-connection receiver nonce (lane/challenge/auth/welcome)
HEADER = struct.Struct("<4sBBHQIIQIQI")
HEADER_SIZE = HEADER.size  # 48
_CHECKED = struct.Struct("<4sBBHQIIQIQ")  # the part the header check covers
_CHECK = struct.Struct("<I")

KIND_DATA = 1
KIND_CONTROL = 2

FLAG_HASHED = 1  # payload hash field is meaningful

# Control message names ("t" field).
HELLO = "hello"  # client -> server: version, role, client nonce
CHALLENGE = "challenge"  # server -> client: server nonce, session id
AUTH = "auth"  # client -> server: proof of key
WELCOME = "welcome"  # server -> client: proof of key, session token, limits
LANE = "lane"  # client -> server on a new data lane: session id, lane index, proof
BEGIN = "begin"  # client -> server: a transfer's manifest
ACCEPT = "accept"  # server -> client: destination ready, send chunks
REJECT = "reject"  # server -> client: transfer refused (reason)
ACK = "ack"  # server -> client: chunk indices verified
NACK = "nack"  # server -> client: chunk indices failed verification, re-send ("lost": a copy broke off
#               mid-read, re-send without counting a retry; "held": another copy is being read, await its verdict)
DONE = "done"  # client -> server: every chunk acknowledged; whole-transfer digest
COMPLETE = "complete"  # server -> client: digest matched, transfer done
CANCEL = "cancel"  # either way: cancel a transfer (reason)
ERROR = "error"  # either way: a transfer or the session failed (reason)
HEARTBEAT = "heartbeat"  # either way, on idle control connections
BYE = "bye"  # either way: orderly session close
APP = "app"  # either way, after authentication: an application's own message ({"op": ...}; kvwire-bench's)

CONTROL_KINDS = frozenset(
    {HELLO, CHALLENGE, AUTH, WELCOME, LANE, BEGIN, ACCEPT, REJECT, ACK, NACK, DONE, COMPLETE, CANCEL, ERROR,
     HEARTBEAT, BYE, APP}
)

MIN_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Upper bounds on everything a peer can claim. Checked before any allocation or read."""

    max_chunk: int = 16 * 1024 * 1024
    max_control: int = 4 * 1024 * 1024
    max_segments: int = 4096  # the largest preset needs 176 (falcon-h1-7b)
    max_chunks: int = 1 << 20
    max_transfer_bytes: int = 64 * 1024**3
    max_layers: int = 1024

    def __post_init__(self) -> None:
        if self.max_chunk < MIN_CHUNK or self.max_control < 1024:
            raise ValueError("limits too small to carry a chunk or a control message")

    @property
    def max_control_containers(self) -> int:
        """The most maps and arrays one control message may decode into (35,840 by default). The largest
        honest one, a BEGIN with its layout at these limits, has one per segment, three per layout tensor
        and two per cache (both at most ``max_segments``) and one per layer: about 25,600. Each costs ~70
        bytes decoded for 1 byte on the wire, so without this bound a 4 MiB frame became ~290 MiB."""
        return 8 * self.max_segments + 2 * self.max_layers + 1024


DEFAULT_LIMITS = Limits()

#: the largest control message either side reads before the peer has authenticated (the handshake's
#: messages are a few hundred bytes): an unauthenticated peer can make a side allocate no more than this.
PREAUTH_MAX_CONTROL = 4096


def preauth_limits(limits: Limits) -> Limits:
    """``limits`` for a connection whose peer has not authenticated yet: control bodies of at most
    ``PREAUTH_MAX_CONTROL`` bytes (data frames are refused before their body is read in any case)."""
    return replace(limits, max_control=min(limits.max_control, PREAUTH_MAX_CONTROL))


class Header(NamedTuple):
    """A validated header. A named tuple, not a dataclass: one is built per chunk on the hot path."""

    kind: int
    flags: int
    transfer_id: int
    chunk: int
    layer: int
    offset: int
    length: int
    digest: int


def pack_header(
    kind: int, transfer_id: int, chunk: int, layer: int, offset: int, length: int, digest: int, flags: int = 0
) -> bytes:
    head = _CHECKED.pack(MAGIC, VERSION, kind, flags, transfer_id, chunk, layer, offset, length, digest)
    return head + _CHECK.pack(xxhash.xxh32_intdigest(head))


def pack_data_header(transfer_id: int, chunk: int, layer: int, offset: int, length: int,
                     digest: int | None) -> bytes:
    """Header for one chunk. ``digest`` None means hashing is off for this transfer."""
    if digest is None:
        return pack_header(KIND_DATA, transfer_id, chunk, layer, offset, length, 0, 0)
    return pack_header(KIND_DATA, transfer_id, chunk, layer, offset, length, digest, FLAG_HASHED)


def unpack_header(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and validate 48 header bytes. Raises ProtocolError on anything unexpected."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, kind, flags, tid, chunk, layer, offset, length, digest, check = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a kvwire peer")
    if version != VERSION:
        raise ProtocolError(f"peer speaks wire version {version}, this side speaks {VERSION}")
    if check != xxhash.xxh32_intdigest(buf[: HEADER_SIZE - 4]):
        raise ProtocolError("header check mismatch: corrupt or desynchronised stream")
    if kind == KIND_DATA:
        if not 0 < length <= limits.max_chunk:
            raise ProtocolError(f"chunk length {length} outside (0, {limits.max_chunk}]")
    elif kind == KIND_CONTROL:
        if not 0 < length <= limits.max_control:
            raise ProtocolError(f"control length {length} outside (0, {limits.max_control}]")
    else:
        raise ProtocolError(f"unknown frame kind {kind}")
    if flags & ~FLAG_HASHED:
        raise ProtocolError(f"unknown flags {flags:#x}")
    return Header(kind, flags, tid, chunk, layer, offset, length, digest)


def encode_control(kind: str, body: dict[str, Any] | None = None) -> bytes:
    """A whole CONTROL frame: header plus msgpack body. The body may not carry its own ``"t"``."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control message kind {kind!r}")
    msg: dict[str, Any] = {"t": kind}
    if body:
        if "t" in body:
            raise ValueError("a control body may not override its kind ('t')")
        msg.update(body)
    payload = msgpack.packb(msg, use_bin_type=True)
    return pack_header(KIND_CONTROL, 0, 0, 0, 0, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _may_hold_more(payload: bytes | bytearray | memoryview, containers: int) -> bool:
    """Whether ``payload`` may hold more than ``containers`` maps and arrays. Every one takes a byte at least,
    and its first is a fixmap or fixarray (0x80-0x9f) or an array or map 16/32 (0xdc-0xdf): such bytes are
    an upper bound, counted at memory speed (13 us for a 100 kB manifest that takes 580 us to decode)."""
    if len(payload) <= containers:
        return False
    b = np.frombuffer(payload, np.uint8)
    return int(np.count_nonzero((b & 0xE0) == 0x80)) + int(np.count_nonzero((b & 0xFC) == 0xDC)) > containers


def _counted(containers: int) -> Any:
    """A ``list_hook`` / ``object_hook`` that passes each decoded map or array through and raises
    ``ProtocolError`` at the one past ``containers``, before msgpack builds any more."""
    left = containers

    def count(obj: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise ProtocolError(f"control message decodes into more than {containers} maps and arrays")
        return obj

    return count


def decode_control(header: Header, payload: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
                   ) -> tuple[str, dict[str, Any]]:
    """Check and unpack a CONTROL body. Container sizes are bounded before msgpack allocates, and their
    number (``Limits.max_control_containers``) as it decodes: a frame decodes into ~20x its size at most."""
    if xxhash.xxh3_64_intdigest(payload) != header.digest:
        raise ProtocolError("control message checksum mismatch")
    hook = None
    if _may_hold_more(payload, limits.max_control_containers):  # then count them exactly (decodes ~1.7x slower)
        hook = _counted(limits.max_control_containers)
    try:
        msg = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=max(limits.max_segments, 1 << 16) * 8,
            max_map_len=4096,
            max_str_len=1 << 20,
            max_bin_len=1 << 20,
            max_ext_len=0,
            list_hook=hook,
            object_hook=hook,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of types on hostile input
        raise ProtocolError(f"undecodable control message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str) or msg["t"] not in CONTROL_KINDS:
        raise ProtocolError("control message without a known 't'")
    kind = msg.pop("t")
    return kind, msg


_MOVED = ("ControlFrame", "DataFrame", "Frame", "FrameDecoder")


def __getattr__(name: str) -> Any:
    """The decoder's names, moved to ``kvwire.testing.decoder``: resolved there with a DeprecationWarning.
    Looked up by name at first use, so that importing the wire format never imports test code."""
    if name in _MOVED:
        warnings.warn(f"kvwire.codec.frames.{name} moved to kvwire.testing.decoder: "
                      f"use 'from kvwire.testing.decoder import {name}'", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("kvwire.testing.decoder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
