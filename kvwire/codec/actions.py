"""The actions both protocol engines return: one class per meaning, whichever end emits it.

Owns: ``Send`` (write a control frame on the control connection), ``Ended`` (a transfer reached its
terminal state: resolve its handle; exactly once per transfer) and ``Fail`` (the control connection is
over: close it and its lanes; only a sender's may ask to dial again). Each engine adds its own side's
actions in its module (the sender's ``LayersAcked``, ``ChunksQueued``; the receiver's ``Admit``,
``CutLanes``) and names the union it returns ``Action``. Must not know: sockets, threads, clocks,
handles, which end emits what, or how a driver performs an action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .transfer import State


@dataclass(frozen=True, slots=True)
class Send:
    """Write this control frame on the control connection."""

    kind: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """The transfer reached its terminal state, once per transfer, ever: resolve its handle (on the
    receiver, only once no lane writes into it any more)."""

    transfer_id: int
    state: State
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The control connection is over: close it and its lanes; the engine's transfers have ended (each
    with an ``Ended`` before this). ``reconnect`` (a sender's session only): the session dials the receiver
    again and carries on; otherwise the session is over and accepts nothing more. A receiver's session is
    its control connection: it never reconnects."""

    reason: str
    reconnect: bool = False
