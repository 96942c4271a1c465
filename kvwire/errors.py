"""The typed errors every kvwire layer raises.

Owns: the exception hierarchy. Must not know anything else: it is the leaf every module may import.
"""

from __future__ import annotations


class KvwireError(Exception):
    """Base of every error kvwire raises on purpose."""


class LayoutError(KvwireError):
    """A layout description is invalid or cannot be built from the given config."""


class LayoutMismatch(KvwireError):
    """Sender and receiver disagree on the cache layout (shape, dtype, layout tag, TP) or request.

    Raised before a single destination byte is written; never silently cast or transposed.
    """


class StatePositionMismatch(LayoutMismatch):
    """The state snapshot was taken at another token position than the receiver resumes from."""


class ReshardUnsupported(LayoutMismatch):
    """Prefill and decode TP differ in a way no re-sharding plan can bridge (indivisible heads, groups that
    cannot be padded, layouts that disagree beyond TP): names the first tensor that cannot be mapped."""


class ReshardRequired(LayoutMismatch):
    """The two sides' TP differ but a re-sharding plan exists: move the cache with ``kvwire.reshard``
    (``ReshardSender``/``ReshardReceiver``), not a direct transfer whose bytes would mean something else."""


class InvalidBuffer(KvwireError, ValueError):
    """A buffer cannot carry a transfer as given: not C-contiguous, read-only where it is written, on a GPU
    (``kvwire.cuda`` stages those), or not a buffer at all. A ``ValueError`` too."""


class ProtocolError(KvwireError):
    """Bytes from the peer violate the wire format or one of its limits."""


class EarlyWindowExceeded(ProtocolError):
    """The sender put more payload on the lanes before its transfers' ACCEPT than the receiver's early
    window allows (``kvwire.codec.early``): the receiver fails the session."""


class AuthenticationError(KvwireError):
    """The peer failed authentication or speaks another protocol version."""


class TransferError(KvwireError):
    """A transfer ended in a terminal state other than done."""


class TransferFailed(TransferError):
    """The transfer failed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransferTimedOut(TransferError):
    """The transfer did not complete before its deadline."""


class TransferCancelled(TransferError):
    """The transfer was cancelled by one of the two sides."""


class ProbeRefused(KvwireError):
    """The receiver takes no capacity probes (``max_probe_bytes=0``, or a kvwire without sink transfers)."""


class PoolExhausted(KvwireError):
    """A bounded buffer pool has no free buffer of the requested size."""


class ConnectError(KvwireError, OSError):
    """A session could not reach or open its connection to ``host:port`` (refused, unresolvable name,
    unreachable, reset during the handshake). An ``OSError`` too, so code that catches socket errors
    keeps working; ``errno`` is the underlying one where there is one, ``__cause__`` the original."""

    def __init__(self, host: str, port: int, why: str, errno: int | None = None) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot connect to {where}: {why}")
        self.host = host
        self.port = port
        self.errno = errno


class ConnectTimeout(ConnectError, TimeoutError):
    """``connect_timeout`` passed before ``host:port`` answered (a ``TimeoutError`` too)."""


class KvwireWarning(UserWarning):
    """Base of the warnings kvwire issues."""


class InsecureReceiverWarning(KvwireWarning):
    """A receiver listens on a non-loopback address without authentication (no key, no client certificates):
    anyone who can reach the port can open sessions and have it fill destination buffers."""
