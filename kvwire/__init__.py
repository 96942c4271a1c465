"""kvwire: move the KV cache of hybrid-attention LLMs between GPUs over ordinary TCP, fast and verified.

The names an engine imports::

    from kvwire import Receiver, connect, RequestSpec, load_layout
"""

from .codec.frames import Limits
from .codec.layout import ModelLayout, RequestSpec, Segment, check_compatible, plan_segments
from .codec.presets import PRESETS, load_layout, load_preset
from .codec.reshard import ReshardPlan, check_reshardable, plan_reshard
from .codec.transfer import State
from .congestion.control import LinkControl
from .congestion.controller import ControllerConfig
from .congestion.estimator import LinkState
from .congestion.group import LaneGroup
from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    InsecureReceiverWarning,
    InvalidBuffer,
    KvwireError,
    KvwireWarning,
    LayoutError,
    LayoutMismatch,
    ProbeRefused,
    ProtocolError,
    ReshardRequired,
    ReshardUnsupported,
    StatePositionMismatch,
    TransferCancelled,
    TransferError,
    TransferFailed,
    TransferTimedOut,
)
from .metrics import Metrics
from .probe import ProbeResult, probe
from .reshard import ReshardIncoming, ReshardOutgoing, ReshardReceiver, ReshardSender
from .tcp import IncomingTransfer, OutgoingTransfer, Receiver, Session, connect

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConnectError",
    "ConnectTimeout",
    "ControllerConfig",
    "IncomingTransfer",
    "InsecureReceiverWarning",
    "InvalidBuffer",
    "KvwireError",
    "KvwireWarning",
    "LaneGroup",
    "LayoutError",
    "LayoutMismatch",
    "Limits",
    "LinkControl",
    "LinkState",
    "Metrics",
    "ModelLayout",
    "OutgoingTransfer",
    "PRESETS",
    "ProbeRefused",
    "ProbeResult",
    "ProtocolError",
    "Receiver",
    "ReshardIncoming",
    "ReshardOutgoing",
    "ReshardPlan",
    "ReshardReceiver",
    "ReshardRequired",
    "ReshardSender",
    "ReshardUnsupported",
    "RequestSpec",
    "Segment",
    "Session",
    "State",
    "StatePositionMismatch",
    "TransferCancelled",
    "TransferError",
    "TransferFailed",
    "TransferTimedOut",
    "check_compatible",
    "check_reshardable",
    "connect",
    "load_layout",
    "load_preset",
    "plan_reshard",
    "plan_segments",
    "probe",
]
