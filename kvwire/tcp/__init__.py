"""Multi-lane TCP transport: sessions of one control connection plus N data lanes."""

from .outgoing import OutgoingTransfer
from .receiver import IncomingTransfer, Receiver
from .sender import Session, connect

__all__ = ["IncomingTransfer", "OutgoingTransfer", "Receiver", "Session", "connect"]
