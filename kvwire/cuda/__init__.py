"""GPU staging: between an engine's paged device cache and host buffers the transport sends from.

Owns: the pinned host buffer pool (``pool``), the description of an engine's cache storage (``paged``),
and the sender-side gather (``Stager``) / receiver-side scatter (``Unstager``). Must not know: sockets,
lanes or the wire format beyond ``plan_segments``; the transport is reached only through duck-typed
``write_layer``/``on_layer`` objects (an ``OutgoingTransfer`` and an ``IncomingTransfer`` fit).
torch and cupy are optional and imported lazily: ``import kvwire.cuda`` works without either.
"""

from __future__ import annotations

from .paged import CacheStorage, PagedCache, allocate_paged_cache, torch_dtype
from .pool import PinnedPool, PooledBuffer
from .stager import StagedLayer, Stager, StagingJob, Unstager, UnstagingJob

__all__ = [
    "CacheStorage",
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
