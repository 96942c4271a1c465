"""kvwire: move the KV cache of hybrid-attention LLMs between GPUs over ordinary TCP, fast and verified.

The names an engine imports::

    from kvwire import Receiver, connect, RequestSpec, load_layout

Owns: the package's public surface, ``__all__``: what an engine needs to move a cache (the receiver and the
session with their transfer handles, the layout and request, and the errors it catches), and joining the
transport to the capacity probe built on it: ``connect`` is ``kvwire.tcp.connect`` with ``kvwire.probe.warm_up``
handed in as its ``warm_up``. Must not know:
anything else. Every other name lives in its own module and is imported from there: the typed errors in
``kvwire.errors``, ``Limits`` in ``kvwire.codec.frames``, presets in ``kvwire.codec.presets``, layouts'
helpers in ``kvwire.codec.layout``, re-sharding in ``kvwire.reshard`` and ``kvwire.codec.reshard``, congestion
control in ``kvwire.congestion.*``, ``Metrics`` in ``kvwire.metrics``, the capacity probe in ``kvwire.probe``.
Names this package exported before keep working as ``kvwire.<name>`` with a ``DeprecationWarning`` that
names their module (``_MOVED``). ``import kvwire`` imports no optional dependency (torch, transformers,
starlette, uvicorn, prometheus_client) and not ``kvwire.testing``.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec

from . import probe as _probe_module
from .codec.layout import ModelLayout, RequestSpec, plan_segments
from .codec.presets import load_layout
from .codec.transfer import State
from .errors import KvwireError, LayoutMismatch, TransferCancelled, TransferFailed, TransferTimedOut
from .tcp import IncomingTransfer, OutgoingTransfer, Receiver, Session
from .tcp import connect as _tcp_connect

__version__ = "0.1.0"

_P = ParamSpec("_P")

__all__ = [
    "IncomingTransfer",
    "KvwireError",
    "LayoutMismatch",
    "ModelLayout",
    "OutgoingTransfer",
    "Receiver",
    "RequestSpec",
    "Session",
    "State",
    "TransferCancelled",
    "TransferFailed",
    "TransferTimedOut",
    "connect",
    "load_layout",
    "plan_segments",
]

#: names the package exported before #13, and the module each now lives in (``kvwire.<name>`` still resolves,
#: to the same object, with a DeprecationWarning naming that module)
_MOVED: dict[str, str] = {
    **dict.fromkeys(("AuthenticationError", "ConnectError", "ConnectTimeout", "InsecureReceiverWarning",
                     "InvalidBuffer", "KvwireWarning", "LayoutError", "ProbeRefused", "ProtocolError",
                     "ReshardRequired", "ReshardUnsupported", "StatePositionMismatch", "TransferError"),
                    "kvwire.errors"),
    "Limits": "kvwire.codec.frames",
    "Segment": "kvwire.codec.layout",
    "check_compatible": "kvwire.codec.compat",
    "PRESETS": "kvwire.codec.presets",
    "load_preset": "kvwire.codec.presets",
    **dict.fromkeys(("ReshardPlan", "check_reshardable", "plan_reshard"), "kvwire.codec.reshard"),
    "LinkControl": "kvwire.congestion.control",
    "ControllerConfig": "kvwire.congestion.controller",
    "LinkState": "kvwire.congestion.estimator",
    "LaneGroup": "kvwire.congestion.group",
    "Metrics": "kvwire.metrics",
    "ProbeResult": "kvwire.probe",
    **dict.fromkeys(("ReshardIncoming", "ReshardOutgoing", "ReshardReceiver", "ReshardSender"), "kvwire.reshard"),
}


def _moved_message(name: str, module: str) -> str:
    return f"kvwire.{name} is deprecated: use 'from {module} import {name}'"


def __getattr__(name: str) -> Any:
    """A name the package exported before, from its own module, with a DeprecationWarning."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(_moved_message(name, module), DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)


def _handing_warm_up(fn: Callable[_P, Session]) -> Callable[_P, Session]:
    """The transport's connect with the warm-up handed in (``warm_up``: ``kvwire.probe.warm_up`` unless given):
    the probe is built on the transport, so only this layer, above both, joins them."""

    @functools.wraps(fn)
    def connect(*args: _P.args, **kwargs: _P.kwargs) -> Session:
        kwargs.setdefault("warm_up", _probe_module.warm_up)
        return fn(*args, **kwargs)

    connect.__module__ = __name__
    return connect


connect = _handing_warm_up(_tcp_connect)


# Deprecated: kvwire.probe(...); use "from kvwire.probe import probe". "probe" is also the name of the module
# kvwire.probe, which Python binds as this package's attribute once anything imports it, so the function cannot
# be a lazy __getattr__ name like the others: this wrapper stays bound here (import kvwire imports the module
# for it, as it did before) and warns on every call.
@functools.wraps(_probe_module.probe)
def probe(*args: Any, **kwargs: Any) -> Any:
    warnings.warn(_moved_message("probe", "kvwire.probe"), DeprecationWarning, stacklevel=2)
    return _probe_module.probe(*args, **kwargs)
