"""Byte views over caller buffers, without copying: numpy arrays, bytearrays, memoryviews, torch tensors.

Owns: turning anything buffer-like into a flat writable/readable ``memoryview`` of its bytes, and
splitting one buffer into per-segment views. Must not know: sockets or the wire format. torch is
imported only when a torch tensor is passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec.layout import Segment
from .errors import LayoutMismatch


def byte_view(obj: Any, writable: bool = False) -> memoryview:
    """A flat ``B`` memoryview over ``obj``'s bytes. Refuses non-contiguous or GPU memory."""
    if type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu":
            raise ValueError("GPU tensors go through kvwire.cuda staging, not straight to the socket")
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous (a copy would be hidden on the data path)")
        import torch

        obj = obj.reshape(-1).view(torch.uint8).numpy()
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and mv.readonly:
        raise ValueError("destination buffer is read-only")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def segment_views(dest: Any, segments: Sequence[Segment], writable: bool = True) -> list[memoryview]:
    """One view per segment: ``dest`` is either one buffer of the total size or one buffer per segment."""
    if isinstance(dest, (list, tuple)):
        if len(dest) != len(segments):
            raise LayoutMismatch(f"{len(dest)} buffers for {len(segments)} segments")
        views = [byte_view(b, writable) for b in dest]
        for v, s in zip(views, segments):
            if len(v) != s.nbytes:
                raise LayoutMismatch(f"segment {s.index} (layer {s.layer}) needs {s.nbytes} bytes, buffer has {len(v)}")
        return views
    whole = byte_view(dest, writable)
    total = sum(s.nbytes for s in segments)
    if len(whole) != total:
        raise LayoutMismatch(f"buffer has {len(whole)} bytes, transfer needs {total}")
    out, pos = [], 0
    for s in segments:
        out.append(whole[pos : pos + s.nbytes])
        pos += s.nbytes
    return out
