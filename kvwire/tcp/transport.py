"""The transport seam: what the protocol engines' drivers need from a connection, and the chunk stage.

Owns: the small interfaces a transport implements (``Stream``: one connection carrying control frames
and, on a lane, data chunks as a header plus payload views; ``Connector``: dialling one), the
``ChunkStage`` interface (a transform or observer every data chunk passes through, on the sender after
hashing and before the wire, on the receiver after the payload is in its destination and before the
hash check), ``ChunkRef`` (which chunk a stage is looking at) and ``IDENTITY`` (no stage). Today's
threaded TCP (``wire.Channel``, ``lanes.Dialer``, ``accept.Acceptor``) is the first implementation; a
shared-memory path for same-host peers or RDMA would be another. Must not know: sessions, transfers,
threads, congestion policy, or any particular transport.

A stage keeps a chunk's length (the data header announces the payload length before the stage runs):
length-preserving transforms (encryption with a stream cipher, fault injection in tests) fit as they
are; a length-changing one (compression) needs a header flag and a receive-side scratch read, and
would add them here, not in the sessions. On the sender the pieces are views of the caller's own
buffers (zero copy), and a chunk goes out again after a NACK or a lost lane: ``outgoing`` must return
transformed bytes in new buffers, never write into the pieces (that would change the caller's cache and
transform a re-sent chunk twice). On the receiver the views are the chunk's destination: ``incoming``
works in place.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..codec.frames import Header


class Stream(Protocol):
    """One connection: control frames both ways; on a data lane, chunks from sender to receiver."""

    @property
    def sock(self) -> socket.socket:
        """The socket underneath (TCP_INFO, pacing, buffer knobs)."""
        ...

    @property
    def closed(self) -> bool: ...

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        """One control frame."""
        ...

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """A data chunk: its packed header, then its payload views, written without joining them."""
        ...

    def read_header(self) -> Header: ...

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly from the stream (a data chunk's payload, straight into its destination)."""
        ...

    def skip(self, nbytes: int, scratch: memoryview) -> None:
        """Read and drop ``nbytes`` (a chunk nobody wants), through ``scratch``."""
        ...

    def read_control_body(self, h: Header) -> tuple[str, dict[str, Any]]: ...

    def read_control(self) -> tuple[str, dict[str, Any]]: ...

    def close(self) -> None:
        """Idempotent; wakes a thread blocked reading it."""
        ...


class Connector(Protocol):
    """Dials one peer: a connected ``Stream`` with nothing sent on it yet."""

    def open(self) -> Stream: ...


@dataclass(frozen=True)
class ChunkRef:
    """The chunk a stage sees: which transfer and chunk, on which lane, and its payload length."""

    lane: int
    transfer_id: int
    chunk: int
    length: int


class ChunkStage(Protocol):
    """Sits on the data path of every chunk. ``outgoing`` returns the pieces to put on the wire (the
    same total length; may be the given list); ``incoming`` may rewrite ``views`` in place. A stage
    that raises fails that chunk's transfer (both ends are told), not the lane; on the sender an
    ``OSError`` is the lane's failure as any other I/O error is."""

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]: ...

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None: ...


class _Identity:
    """No stage: chunks pass untouched (the default)."""

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        return None


IDENTITY: ChunkStage = _Identity()
