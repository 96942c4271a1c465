"""Multi-lane TCP transport: sessions of one control connection plus N data lanes."""

from .receiver import IncomingTransfer, Receiver
from .sender import OutgoingTransfer, Session, connect

__all__ = ["IncomingTransfer", "OutgoingTransfer", "Receiver", "Session", "connect"]
