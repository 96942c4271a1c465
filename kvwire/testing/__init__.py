"""Test and benchmark harness: an emulated WAN link between network namespaces.

Owns: ``WanLink`` (``wan``) and its parts — namespace plumbing (``netns``), the pure per-direction link
model (``linkmodel``), NFQUEUE over raw netlink (``nfqueue``) and the emulator process (``emulator``).
Must not know: kvwire's transport or congestion internals; nothing in ``kvwire`` proper imports this.
"""

from .wan import WanError, WanLink, unavailable_reason

__all__ = ["WanError", "WanLink", "unavailable_reason"]
