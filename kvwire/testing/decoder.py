"""An incremental frame decoder for code that has the byte stream in hand: tests, fuzzers, proxies.

Owns: ``FrameDecoder`` (``feed`` any slices of a kvwire byte stream, get whole frames back) and the frame
values it returns. Must not know: sockets, threads, clocks or transfer state. The transport itself does not
use it (it reads headers with ``codec.frames.unpack_header`` and receives bodies straight into destination
buffers); this is the same validation rules for bytes already in memory. Moved here from
``kvwire.codec.frames``, where its names remain as deprecated aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..codec.frames import DEFAULT_LIMITS, HEADER_SIZE, KIND_CONTROL, Header, Limits, decode_control, unpack_header
from ..errors import ProtocolError


@dataclass(frozen=True)
class ControlFrame:
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class DataFrame:
    header: Header
    payload: bytes


Frame = ControlFrame | DataFrame


class FrameDecoder:
    """Incremental decoder: ``feed`` any slices of the byte stream, get whole frames back.

    It never buffers more than one header plus one bounded body. After a ProtocolError the
    stream is unusable (there is no resynchronisation on TCP) and every later call raises again.
    The I/O layer uses ``unpack_header`` directly to ``recv_into`` destination buffers; this class is
    the same rules for code that has bytes in hand (tests, fuzzing, proxies).
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._header: Header | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append ``data``; return every frame now complete (raises ProtocolError on a bad one)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        buf, pos = self._buf, 0  # consumed bytes are cut once per feed, not once per frame
        out: list[Frame] = []
        try:
            while True:
                if self._header is None:
                    if len(buf) - pos < HEADER_SIZE:
                        break
                    self._header = unpack_header(bytes(buf[pos:pos + HEADER_SIZE]), self._limits)
                    pos += HEADER_SIZE
                h = self._header
                if len(buf) - pos < h.length:
                    break
                payload = bytes(buf[pos:pos + h.length])
                pos += h.length
                self._header = None
                if h.kind == KIND_CONTROL:
                    kind, body = decode_control(h, payload, self._limits)
                    out.append(ControlFrame(kind, body))
                else:
                    out.append(DataFrame(h, payload))
        except ProtocolError as e:
            self._error = e
            self._buf.clear()
            raise
        del buf[:pos]
        return out
