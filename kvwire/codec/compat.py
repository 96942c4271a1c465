"""Can two layouts exchange bytes? Directly, through a re-sharding plan, or not at all (a typed error).

Owns: ``check_compatible``, the check both ends run before a byte is written: the first difference between
a sender's and a receiver's layout that changes the meaning of the bytes, and when only TP differs, whether a
re-sharding plan bridges it. Must not know: sockets, threads, clocks, torch, or how layouts are built. It sits
above ``layout`` (what a layout is) and ``reshard`` (the plans), so neither needs the other's module.
"""

from __future__ import annotations

from ..errors import LayoutMismatch, ReshardRequired, ReshardUnsupported
from .layout import ModelLayout
from .reshard import plan_reshard


def check_compatible(sender: ModelLayout, receiver: ModelLayout, *, reshard: bool = False) -> None:
    """Raise LayoutMismatch naming the first difference that changes the meaning of the bytes.

    TP sizes that differ: ``ReshardUnsupported`` when no re-sharding plan bridges them (``codec.reshard``),
    else ``ReshardRequired`` (a direct transfer would mean other bytes; ``kvwire.reshard.ReshardSender`` and
    ``ReshardReceiver`` move it), or, with ``reshard=True``, no error: the plan checked every tensor.
    """
    if reshard or sender.tp_size != receiver.tp_size:
        try:
            plan_reshard(sender, receiver)
        except ReshardUnsupported as e:
            raise ReshardUnsupported(f"TP differs (sender tp={sender.tp_size}, receiver tp={receiver.tp_size}) "
                                     f"and no re-sharding plan bridges it: {e}") from None
        if reshard:
            return
        raise ReshardRequired(
            f"TP differs: sender tp={sender.tp_size} rank={sender.tp_rank}, receiver tp={receiver.tp_size} "
            f"rank={receiver.tp_rank}; a re-sharding plan exists: move it with kvwire.reshard.ReshardSender and "
            f"ReshardReceiver (each decode rank receives only its slices)")
    if (sender.tp_size, sender.tp_rank) != (receiver.tp_size, receiver.tp_rank):
        raise LayoutMismatch(
            f"TP differs: sender tp={sender.tp_size} rank={sender.tp_rank}, "
            f"receiver tp={receiver.tp_size} rank={receiver.tp_rank}"
        )
    if sender.num_layers != receiver.num_layers:
        raise LayoutMismatch(f"layer count differs: {sender.num_layers} vs {receiver.num_layers}")
    for ls, lr in zip(sender.layers, receiver.layers):
        if ls.kinds != lr.kinds:
            raise LayoutMismatch(f"layer {ls.index}: cache kinds {ls.kinds} vs {lr.kinds}")
        for cs, cr in zip(ls.caches, lr.caches):
            if cs.window != cr.window:
                raise LayoutMismatch(f"layer {ls.index} {cs.kind}: window {cs.window} vs {cr.window}")
            if len(cs.tensors) != len(cr.tensors):
                raise LayoutMismatch(f"layer {ls.index} {cs.kind}: tensor count differs")
            for ts, tr in zip(cs.tensors, cr.tensors):
                where = f"layer {ls.index} {cs.kind}.{ts.name}"
                if ts.name != tr.name:
                    raise LayoutMismatch(f"{where}: tensor name {ts.name!r} vs {tr.name!r}")
                if ts.dtype != tr.dtype:
                    raise LayoutMismatch(f"{where}: dtype {ts.dtype} vs {tr.dtype} (never cast silently)")
                if ts.layout != tr.layout:
                    raise LayoutMismatch(f"{where}: layout {ts.layout} vs {tr.layout}")
                if ts.shape != tr.shape:
                    raise LayoutMismatch(f"{where}: shape {ts.shape} vs {tr.shape}")
                if ts.sub_projections != tr.sub_projections or ts.replicated != tr.replicated:
                    raise LayoutMismatch(f"{where}: TP sharding differs")
    if sender.fingerprint() != receiver.fingerprint():  # pragma: no cover - covered by the loop above
        raise LayoutMismatch("layout fingerprints differ")
