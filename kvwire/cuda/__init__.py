"""GPU staging: between an engine's paged device cache and host buffers the transport sends from.

Owns: the pinned host buffer pool (``pool``), the description of an engine's cache storage (``paged``),
the host placement and per-layer copy plans (``plan``), the CUDA stream/event/scratch side (``streams``),
and the sender-side copies to host (``stager.Stager``) / receiver-side copies to device
(``unstager.Unstager``). Must not know: sockets, lanes or the wire format beyond ``plan_segments``; the
transport is reached only through duck-typed ``write_layer``/``on_layer`` objects (an ``OutgoingTransfer``
and an ``IncomingTransfer`` fit).
torch and cupy are optional and imported lazily: ``import kvwire.cuda`` works without either.
"""

from __future__ import annotations

from .paged import CacheStorage, PagedCache, allocate_paged_cache, torch_dtype
from .plan import LayerPlan
from .pool import PinnedPool, PooledBuffer
from .stager import StagedLayer, Stager, StagingJob
from .unstager import Unstager, UnstagingJob

__all__ = [
    "CacheStorage",
    "LayerPlan",
    "PagedCache",
    "PinnedPool",
    "PooledBuffer",
    "StagedLayer",
    "Stager",
    "StagingJob",
    "Unstager",
    "UnstagingJob",
    "allocate_paged_cache",
    "torch_dtype",
]
