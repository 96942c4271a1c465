"""The early window: payload a sender may put on the lanes before its transfer's ACCEPT comes back.

Owns: ``EarlyWindow`` (how many payload bytes per transfer, in all, and how many transfers at once a
receiver lets a sender send before it answered their BEGIN), its advertisement in the WELCOME ``limits``
(``advertise``; absent keys, as from an older receiver, mean no early window: the sender waits for ACCEPT
as before) and reading it back (``parse``), and ``EarlyLedger``, the accounting both ends keep of early
bytes: the sender charges a chunk when it hands it out before ACCEPT, the receiver when its header arrives
before the transfer is activated or refused. Each end releases a transfer's charge only on its own side of
the answer (the receiver when it sends ACCEPT/REJECT, the sender when it reads it), so at any moment what
the receiver counts is at most what the sender counted: a receiver that sees more than the window holds a
sender that broke the rule (``EarlyWindowExceeded``). Also the early DONE: a receiver that holds a DONE
arriving before every chunk is verified (and answers it once they are) says so in its WELCOME ``limits``
(``DONE_EARLY``; ``parse_done_early``), and its sender then sends DONE as the last chunk first goes out,
not one round trip later after the last ACK. Must not know: sockets, threads, clocks, buffers,
manifests or chunk plans (a chunk is its transfer id and length here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import EarlyWindowExceeded

#: the receiver's default ``early_bytes`` (payload per transfer before ACCEPT); 0 turns the window off
DEFAULT_EARLY_BYTES = 64 * 1024 * 1024
#: transfers a sender may have sent early chunks of, not yet answered, at once
EARLY_TRANSFERS = 16
_KEYS = ("early_bytes", "early_session_bytes", "early_transfers")


@dataclass(frozen=True)
class EarlyWindow:
    """``per_transfer`` payload bytes of one transfer, ``per_session`` of all a session's unanswered
    transfers together, over at most ``transfers`` unanswered transfers at once."""

    per_transfer: int
    per_session: int
    transfers: int

    @classmethod
    def for_receiver(cls, early_bytes: int) -> EarlyWindow | None:
        """The window a receiver with ``early_bytes`` grants (None: 0, off). ``ValueError`` if negative."""
        if type(early_bytes) is not int or early_bytes < 0:
            raise ValueError(f"early_bytes must be an int >= 0 (0 turns early chunks off), got {early_bytes!r}")
        return cls(early_bytes, 2 * early_bytes, EARLY_TRANSFERS) if early_bytes else None

    def advertise(self) -> dict[str, int]:
        """The keys a receiver adds to its WELCOME ``limits``."""
        return dict(zip(_KEYS, (self.per_transfer, self.per_session, self.transfers)))


#: the WELCOME ``limits`` key (value ``True``) of a receiver that holds an early DONE
DONE_EARLY = "done_early"


def parse_done_early(limits: dict[str, Any]) -> bool:
    """Whether a receiver's WELCOME ``limits`` say it holds an early DONE (absent, as from an older
    receiver, or anything but ``True``: DONE waits for the last ACK)."""
    return limits.get(DONE_EARLY) is True


def parse(limits: dict[str, Any]) -> EarlyWindow | None:
    """The window a receiver's WELCOME ``limits`` grant; None when it grants none (an older receiver, or
    ``early_bytes=0``) or a value is not a positive int (then early chunks are not risked)."""
    vals = [limits.get(k) for k in _KEYS]
    if not all(type(v) is int and 0 < v < 1 << 62 for v in vals):
        return None
    per_transfer, per_session, transfers = vals
    assert isinstance(per_transfer, int) and isinstance(per_session, int) and isinstance(transfers, int)
    return EarlyWindow(per_transfer, min(per_session, 1 << 40), min(transfers, 1024))


class EarlyLedger:
    """Early bytes by transfer id, charged until that transfer's answer releases them."""

    def __init__(self, window: EarlyWindow | None) -> None:
        self.window = window
        self.by_transfer: dict[int, int] = {}
        self.total = 0

    def room(self, tid: int) -> int:
        """Payload bytes ``tid`` may still send early (0: none, or no window)."""
        w = self.window
        if w is None or (tid not in self.by_transfer and len(self.by_transfer) >= w.transfers):
            return 0
        return max(0, min(w.per_transfer - self.by_transfer.get(tid, 0), w.per_session - self.total))

    def charge(self, tid: int, nbytes: int) -> None:
        """``nbytes`` of ``tid`` went (or arrived) early. ``EarlyWindowExceeded`` (a ``ProtocolError``) when
        that exceeds the window (on the receiver: the sender broke it)."""
        if nbytes > self.room(tid):
            w = self.window
            raise EarlyWindowExceeded(
                "early chunks exceed the receiver's window" if w is None else
                f"early chunks exceed the receiver's window: transfer {tid} would hold "
                f"{self.by_transfer.get(tid, 0) + nbytes} of {w.per_transfer} bytes, the session "
                f"{self.total + nbytes} of {w.per_session}, over {len(self.by_transfer)} of {w.transfers} transfers")
        self.by_transfer[tid] = self.by_transfer.get(tid, 0) + nbytes
        self.total += nbytes

    def pending(self, tid: int) -> bool:
        """``tid`` holds early bytes not yet released."""
        return tid in self.by_transfer

    def release(self, tid: int) -> None:
        """``tid`` was answered (ACCEPT or REJECT): its early bytes no longer count."""
        self.total -= self.by_transfer.pop(tid, 0)

    def clear(self) -> None:
        self.by_transfer.clear()
        self.total = 0
