"""Multi-lane TCP transport: sessions of one control connection plus N data lanes.

Owns: the threaded TCP drivers of the sans-IO protocol engines (``codec.txengine``, ``codec.rxengine``):
the sending session (``sender``, its lanes' threads in ``txlanes``, dialling in ``lanes``), the receiver
and its sessions (``receiver``, ``rxsession``, listening in ``accept``, the handshake's I/O in ``auth``,
the pre-authentication bound in ``gate``), the transfer handles (``outgoing``, ``incoming``, ``handle``),
user callbacks off the protocol threads (``callbacks``), socket plumbing (``wire``), a gated HTTP server
(``httpd``: the metrics endpoint, SGLang's bootstrap) and the transport seam with its chunk stage
(``transport``). Must not know: which control message is legal when, verdicts or deadlines (the
engines'), torch/cupy, congestion policy (``kvwire.congestion`` drives the lanes through ``Session``'s
public methods).
"""

from .outgoing import OutgoingTransfer
from .receiver import IncomingTransfer, Receiver
from .sender import Session, connect

__all__ = ["IncomingTransfer", "OutgoingTransfer", "Receiver", "Session", "connect"]
