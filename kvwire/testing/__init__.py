"""Test and benchmark harness: an emulated WAN link between network namespaces, test models, a frame decoder.

Owns: ``WanLink`` (``wan``) and its parts — namespace plumbing (``netns``), the pure per-direction link
model (``linkmodel``), NFQUEUE over raw netlink (``nfqueue``) and the emulator process (``emulator``); the
tiny test models and their deterministic payloads (``fixtures``); ``FrameDecoder`` for byte streams in hand
(``decoder``). Must not know: kvwire's transport or congestion internals; nothing in ``kvwire`` proper
imports this (``import kvwire`` leaves it unloaded: it is for tests and benchmarks).
"""

from .wan import WanError, WanLink, unavailable_reason

__all__ = ["WanError", "WanLink", "unavailable_reason"]
