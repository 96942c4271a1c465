"""Byte views over caller buffers, without copying: numpy arrays, bytearrays, memoryviews, torch tensors.

Owns: turning anything buffer-like into a flat writable/readable ``memoryview`` of its bytes, and
splitting one buffer into per-segment views. Must not know: sockets or the wire format. torch is
imported only when a torch tensor is passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec.layout import Segment
from .errors import InvalidBuffer, LayoutMismatch


def byte_view(obj: Any, writable: bool = False) -> memoryview:
    """A flat ``B`` memoryview over ``obj``'s bytes. ``InvalidBuffer`` for non-contiguous, read-only (when
    ``writable``) or GPU memory, or an object that exposes no buffer."""
    if type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu":
            raise InvalidBuffer("GPU tensors go through kvwire.cuda staging, not straight to the socket")
        if not obj.is_contiguous():
            raise InvalidBuffer("tensor must be contiguous (a copy would be hidden on the data path)")
        import torch

        obj = obj.reshape(-1).view(torch.uint8).numpy()
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidBuffer(f"{type(obj).__name__} is not a buffer (use numpy arrays, bytearrays, memoryviews "
                            f"or CPU torch tensors)") from None
    if not mv.c_contiguous:
        raise InvalidBuffer("buffer must be C-contiguous")
    if writable and mv.readonly:
        raise InvalidBuffer("destination buffer is read-only")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def check_destination(dest: Any, segments: tuple[int, int], nbytes: tuple[int, int | None]) -> None:
    """Refuse, before any transfer arrives, a destination that cannot hold one: every buffer must be
    writable and contiguous; one buffer must have ``nbytes[0]..nbytes[1]`` bytes (``None``: no upper
    bound), a list of them ``segments[0]..segments[1]`` buffers of that many bytes together."""
    if isinstance(dest, (list, tuple)):
        views = [byte_view(b, writable=True) for b in dest]
        lo, hi = segments
        if not lo <= len(views) <= hi:
            raise LayoutMismatch(f"{len(views)} buffers, the transfer has {lo}..{hi} segments")
    else:
        views = [byte_view(dest, writable=True)]
    got, (lo, top) = sum(len(v) for v in views), nbytes
    if got < lo or (top is not None and got > top):
        need = f"{lo}" if top == lo else f"{lo}..{top}" if top is not None else f"at least {lo}"
        raise LayoutMismatch(f"destination has {got} bytes, the transfer needs {need}")


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
