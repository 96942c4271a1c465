"""Explicit layout conversions of cached state tensors, on numpy arrays.

Owns: conv state SD <-> DS, HF's full-width conv ``(dim, K)`` <-> the engines' ``K-1`` columns, the
GDN/KDA recurrent state HVK <-> HKV, and ``convert_tensor``, which maps an array from one
``TensorSpec`` to another. Every function checks its input shape, returns a new C-contiguous array and
never changes the dtype (a dtype change is a LayoutMismatch, never a silent cast). Must not know:
sockets, threads, torch, engine storage or the wire.

The primitives act on the last two axes, so leading batch/layer axes (HF ``(B, dim, K)``) pass through.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import LayoutMismatch
from .layout import TOKEN, TensorSpec

#: numpy dtype names that may carry each kvwire dtype (numpy has no bfloat16/float8 of its own).
NUMPY_FORMS: dict[str, tuple[str, ...]] = {
    "float32": ("float32",),
    "float16": ("float16",),
    "bfloat16": ("bfloat16", "uint16", "int16"),
    "float8_e4m3fn": ("float8_e4m3fn", "uint8", "int8"),
    "float8_e5m2": ("float8_e5m2", "uint8", "int8"),
    "int8": ("int8",),
    "uint8": ("uint8",),
}


def _tail(a: np.ndarray, what: str, rows: int | None = None, cols: int | None = None, ndim: int = 2) -> None:
    if a.ndim < ndim:
        raise LayoutMismatch(f"{what}: needs at least {ndim} axes, got shape {a.shape}")
    r, c = a.shape[-2], a.shape[-1]
    if (rows is not None and r != rows) or (cols is not None and c != cols):
        raise LayoutMismatch(f"{what}: expected trailing shape ({rows}, {cols}), got {a.shape}")


def _swap_last_two(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def conv_sd_to_ds(a: np.ndarray, *, dim: int | None = None, state_len: int | None = None) -> np.ndarray:
    """``(..., K-1, dim)`` -> ``(..., dim, K-1)``."""
    _tail(a, "conv SD->DS", state_len, dim)
    return _swap_last_two(a)


def conv_ds_to_sd(a: np.ndarray, *, dim: int | None = None, state_len: int | None = None) -> np.ndarray:
    """``(..., dim, K-1)`` -> ``(..., K-1, dim)``."""
    _tail(a, "conv DS->SD", dim, state_len)
    return _swap_last_two(a)


def conv_hf_to_ds(a: np.ndarray, *, dim: int | None = None, kernel: int | None = None) -> np.ndarray:
    """HF ``(..., dim, K)`` -> engine ``(..., dim, K-1)``: drops column 0, the oldest input.

    HF left-pads and keeps the newest input in the last column; engines keep only the last K-1.
    """
    _tail(a, "conv HF->DS", dim, kernel)
    if a.shape[-1] < 2:
        raise LayoutMismatch(f"conv HF->DS: kernel width {a.shape[-1]} < 2 leaves no state")
    return np.ascontiguousarray(a[..., 1:])


def conv_ds_to_hf(a: np.ndarray, *, dim: int | None = None, state_len: int | None = None) -> np.ndarray:
    """Engine ``(..., dim, K-1)`` -> HF ``(..., dim, K)`` with a zero column 0 (the oldest input).

    The engine state no longer holds that input. HF's ``causal_conv1d_update`` rolls the window left
    before it reads it, so column 0 is discarded unread: engine -> HF -> engine is exact, and
    HF -> engine -> HF only zeroes the oldest column.
    """
    _tail(a, "conv DS->HF", dim, state_len)
    out = np.zeros((*a.shape[:-1], a.shape[-1] + 1), dtype=a.dtype)
    out[..., 1:] = a
    return out


def ssm_hvk_to_hkv(a: np.ndarray, *, d_k: int | None = None, d_v: int | None = None) -> np.ndarray:
    """GDN/KDA recurrent ``(..., H, V, K)`` -> ``(..., H, K, V)`` (HF transformers, older engines)."""
    _tail(a, "ssm HVK->HKV", d_v, d_k, ndim=3)
    return _swap_last_two(a)


def ssm_hkv_to_hvk(a: np.ndarray, *, d_k: int | None = None, d_v: int | None = None) -> np.ndarray:
    """GDN/KDA recurrent ``(..., H, K, V)`` -> ``(..., H, V, K)`` (vLLM >= #33291, SGLang >= #20283)."""
    _tail(a, "ssm HKV->HVK", d_k, d_v, ndim=3)
    return _swap_last_two(a)


_Conversion = Callable[[np.ndarray], np.ndarray]

_CONVERSIONS: dict[tuple[str, str], _Conversion] = {
    ("conv:SD", "conv:DS"): conv_sd_to_ds,
    ("conv:DS", "conv:SD"): conv_ds_to_sd,
    ("conv:HF", "conv:DS"): conv_hf_to_ds,
    ("conv:HF", "conv:SD"): lambda a: conv_ds_to_sd(conv_hf_to_ds(a)),
    ("conv:DS", "conv:HF"): conv_ds_to_hf,
    ("conv:SD", "conv:HF"): lambda a: conv_ds_to_hf(conv_sd_to_ds(a)),
    ("ssm:HVK", "ssm:HKV"): ssm_hvk_to_hkv,
    ("ssm:HKV", "ssm:HVK"): ssm_hkv_to_hvk,
}


def check_array(array: np.ndarray, spec: TensorSpec, tokens: int | None = None) -> None:
    """Raise LayoutMismatch unless ``array`` has ``spec``'s dtype and shape.

    Token-indexed specs expect a leading token axis (``tokens`` long when given).
    """
    forms = NUMPY_FORMS.get(spec.dtype, (spec.dtype,))
    if array.dtype.name not in forms:
        raise LayoutMismatch(
            f"tensor {spec.name!r}: array dtype {array.dtype.name} does not carry {spec.dtype}"
        )
    if spec.indexing == TOKEN:
        ok = array.ndim == len(spec.shape) + 1 and tuple(array.shape[1:]) == spec.shape
        ok = ok and (tokens is None or array.shape[0] == tokens)
        expected = f"(tokens, {', '.join(map(str, spec.shape))})"
    else:
        ok = tuple(array.shape) == spec.shape
        expected = str(spec.shape)
    if not ok:
        raise LayoutMismatch(
            f"tensor {spec.name!r} ({spec.layout}): expected shape {expected}, got {array.shape}"
        )


def convert_tensor(array: np.ndarray, from_spec: TensorSpec, to_spec: TensorSpec) -> np.ndarray:
    """``array`` laid out per ``from_spec``, as a new contiguous array laid out per ``to_spec``.

    Refuses (LayoutMismatch) a dtype change, a change of tensor, indexing or TP sharding, a shape that
    does not match ``from_spec``, and any layout pair without an explicit conversion.
    """
    if from_spec.dtype != to_spec.dtype:
        raise LayoutMismatch(
            f"tensor {from_spec.name!r}: dtype {from_spec.dtype} -> {to_spec.dtype} refused "
            "(never cast silently)"
        )
    if (from_spec.name, from_spec.indexing) != (to_spec.name, to_spec.indexing):
        raise LayoutMismatch(f"cannot convert tensor {from_spec.name!r} into {to_spec.name!r}")
    if (from_spec.sub_projections, from_spec.replicated) != (to_spec.sub_projections, to_spec.replicated):
        raise LayoutMismatch(f"tensor {from_spec.name!r}: TP sharding differs; conversion does not reshard")
    check_array(array, from_spec)
    if from_spec.layout == to_spec.layout:
        out = np.array(array, copy=True, order="C")
    else:
        try:
            conversion = _CONVERSIONS[(from_spec.layout, to_spec.layout)]
        except KeyError:
            raise LayoutMismatch(
                f"tensor {from_spec.name!r}: no conversion from {from_spec.layout} to {to_spec.layout}"
            ) from None
        out = conversion(array)
    check_array(out, to_spec)
    return out
