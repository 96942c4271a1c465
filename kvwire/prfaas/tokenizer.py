"""The front door's tokenizer: UTF-8 bytes are the tokens (ids 0-255), plus stop-sequence matching.

Owns: ``ByteTokenizer`` (text <-> ids; an incremental decoder for streaming that never splits a multi-byte
character across chunks; ids past 255, which a larger model vocabulary can emit, read ``<|id|>``) and
``StopMatcher`` (holds back generated ids that may be the start of a stop sequence, so a stop sequence is never
shown to the client, as OpenAI's ``stop`` behaves).
Must not know: the model, nodes, HTTP. The model's vocabulary only has to be >= ``ByteTokenizer.size``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class TokenizerError(ValueError):
    """A prompt or stop sequence the tokenizer cannot take (empty, ids out of range, wrong type)."""


class ByteTokenizer:
    """Byte-level: ``encode("hé") == [104, 195, 169]``; ``decode`` replaces invalid UTF-8 with U+FFFD."""

    size = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, not {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        d = StreamDecoder()
        return d.feed(list(ids)) + d.flush()

    def check(self, ids: Sequence[object], vocab: int | None = None, *, allow_empty: bool = False) -> list[int]:
        """``ids`` as ints in [0, vocab) (default: this tokenizer's size), or ``TokenizerError`` naming the
        first bad one."""
        top = self.size if vocab is None else vocab
        if not allow_empty and not ids:
            raise TokenizerError("empty token list")
        out: list[int] = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < top:
                raise TokenizerError(f"token {i} is {t!r}: ids must be ints in [0, {top})")
            out.append(t)
        return out

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()


class StreamDecoder:
    """``feed(ids) -> text`` so far complete; ``flush()`` the rest (an unfinished character as U+FFFD)."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for t in ids:
            if 0 <= t < ByteTokenizer.size:
                run.append(t)
                continue
            out.append(self._dec.decode(bytes(run)) + self._dec.decode(b"", final=True) + f"<|{t}|>")
            self._dec.reset()
            run.clear()
        out.append(self._dec.decode(bytes(run)))
        return "".join(out)

    def flush(self) -> str:
        return str(self._dec.decode(b"", final=True))


class StopMatcher:
    """Feed generated ids one by one; get back the ids that are safe to show. ``stopped`` turns true when
    the output ends with a stop sequence (which is then dropped, never shown). ``flush()`` returns what
    was held back when generation ended for another reason."""

    def __init__(self, stops: Sequence[Sequence[int]]) -> None:
        self.stops = [list(s) for s in stops if len(s)]
        self._held: list[int] = []
        self.stopped = False

    def feed(self, token: int) -> list[int]:
        if self.stopped:
            return []
        self._held.append(token)
        for s in self.stops:
            if self._held[-len(s):] == s:
                self.stopped = True
                self._held = self._held[:-len(s)]
                out, self._held = self._held, []
                return out
        # keep the longest tail that is a proper prefix of some stop sequence; release the rest
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held[-k:] == s[:k]:
                    keep = k
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> list[int]:
        out, self._held = self._held, []
        return out
