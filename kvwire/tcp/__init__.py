"""Multi-lane TCP transport: sessions of one control connection plus N data lanes.

Owns: the threaded TCP drivers of the sans-IO protocol engines (``codec.txengine``, ``codec.rxengine``):
the sending session (``_sender``, its connections and engine actions in ``_txconnection``, its lanes'
threads in ``_txlanes``, dialling in ``_lanes``), the receiver and its sessions (``_receiver``,
``_rxsession``, listening in ``_accept``, the handshake's I/O in ``_auth``, the pre-authentication bound
in ``_gate``), the transfer handles (``_outgoing``, ``_incoming``,
``_handle``), user callbacks off the protocol threads (``_callbacks``), socket plumbing (``_wire``), a gated
HTTP server (``_httpd``: the metrics endpoint, SGLang's bootstrap) and the transport seam with its chunk
stage (``transport``). Must not know: which control message is legal when, verdicts or deadlines (the
engines'), torch/cupy, congestion policy (``kvwire.congestion`` drives the lanes through ``Session``'s
public methods).

The package's face is this module (what the rest of kvwire and its users import) and ``transport`` (the
seam a new transport implements); the modules with a leading underscore are its inside and may change
without notice. Their old names (``kvwire.tcp.sender``, ``kvwire.tcp.wire``...) still import, with a
``DeprecationWarning``, until 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

from ._auth import client_handshake, server_handshake, server_hello
from ._gate import HandshakeGate, Ticket
from ._handle import LayerOutcome, Outcome
from ._httpd import GatedHTTPServer
from ._lanes import LONG_PATH_RTT, LaneHook, LaneInfo
from ._outgoing import OutgoingTransfer
from ._receiver import IncomingTransfer, Receiver
from ._sender import Session, WarmUp, connect
from ._wire import Channel, PeerClosed, host_port, listen, recv_exact_into
from .transport import ChunkRef, ChunkStage

__all__ = [
    "LONG_PATH_RTT",
    "Channel", "ChunkRef", "ChunkStage", "GatedHTTPServer", "HandshakeGate", "IncomingTransfer", "LaneHook",
    "LaneInfo", "LayerOutcome", "OutgoingTransfer", "Outcome", "PeerClosed", "Receiver", "Session", "Ticket",
    "WarmUp", "client_handshake", "connect", "host_port", "listen", "recv_exact_into", "server_handshake",
    "server_hello",
]

#: modules made private in 0.2, by their old name
MOVED = ("accept", "auth", "callbacks", "gate", "handle", "httpd", "incoming", "lanes", "outgoing", "receiver",
         "rxsession", "sender", "txlanes", "wire")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import kvwire.tcp.sender`` (any name of ``MOVED``): the private module, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = f"{__name__}._{spec.name.rpartition('.')[2]}"
        warnings.warn(f"{spec.name} is private now ({new}); import what you need from {__name__}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        return None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
