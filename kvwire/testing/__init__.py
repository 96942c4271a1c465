"""Test and benchmark harness: test models, a frame decoder, fault injection, recordings, an emulated WAN link.

Owns, one module each: the tiny test models and their deterministic payloads (``fixtures``);
``FrameDecoder`` for byte streams in hand (``decoder``); ``ChunkHook``, a chunk stage that injects faults
on a sender's data path (``faults``); ``record``/``recorded``, a ``LinkControl``'s published states
(``recording``); ``FluidLink``, a fluid model of lanes through one bottleneck on a simulated clock
(``fluidlink``); and ``WanLink`` (``wan``), the emulated WAN link between network namespaces, with its
parts: namespace plumbing (``netns``), the pure per-direction link model (``linkmodel``), NFQUEUE over
raw netlink (``nfqueue``) and the emulator process (``emulator``). Only ``WanLink`` and its helpers are
re-exported here; import the others from their modules. Must not know: kvwire's transport or congestion
internals (it uses their public seams only). ``import kvwire`` leaves it unloaded; only the bench's and
the PrfaaS launcher's ``--emulate`` paths (lazily) and the deprecated aliases (``codec.fixtures``, ``codec.frames``'
decoder names) import it.
"""

from .wan import WanError, WanLink, unavailable_reason

__all__ = ["WanError", "WanLink", "unavailable_reason"]
