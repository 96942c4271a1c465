"""Layout conversions: index-coded round trips with asymmetric dims, and refusals of wrong shapes/dtypes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.codec.convert import (
    check_array,
    conv_ds_to_hf,
    conv_ds_to_sd,
    conv_hf_to_ds,
    conv_sd_to_ds,
    convert_tensor,
    ssm_hkv_to_hvk,
    ssm_hvk_to_hkv,
)
from kvwire.codec.layout import ModelLayout, TensorSpec
from kvwire.errors import LayoutMismatch
from kvwire.testing.fixtures import index_coded, load_fixture

H, DV, DK = 4, 48, 32  # tiny-qwen3-next GDN state, V-major


def _tensor(layout: ModelLayout, layer: int, kind: str, name: str) -> TensorSpec:
    cache = next(c for c in layout.layers[layer].caches if c.kind == kind)
    return next(t for t in cache.tensors if t.name == name)


def test_ssm_hvk_hkv_index_coded() -> None:
    hvk = index_coded((H, DV, DK))  # hvk[h, v, k] = h*4096 + v*64 + k
    hkv = ssm_hvk_to_hkv(hvk, d_k=DK, d_v=DV)
    assert hkv.shape == (H, DK, DV) and hkv.flags.c_contiguous and not np.shares_memory(hkv, hvk)
    h, k, v = np.indices(hkv.shape)
    assert np.array_equal(hkv, (h * 4096 + v * 64 + k).astype(np.float32))
    assert np.array_equal(ssm_hkv_to_hvk(hkv, d_k=DK, d_v=DV), hvk)


def test_ssm_wrong_orientation_is_refused() -> None:
    hvk = index_coded((H, DV, DK))
    with pytest.raises(LayoutMismatch, match="HKV->HVK"):
        ssm_hkv_to_hvk(hvk, d_k=DK, d_v=DV)  # it is (H, V, K), not (H, K, V)
    with pytest.raises(LayoutMismatch, match="at least 3 axes"):
        ssm_hvk_to_hkv(np.zeros((DV, DK), np.float32))


def test_conv_sd_ds_index_coded() -> None:
    sd = index_coded((3, 320), base=1024)  # sd[s, d] = s*1024 + d
    ds = conv_sd_to_ds(sd, dim=320, state_len=3)
    d, s = np.indices(ds.shape)
    assert ds.shape == (320, 3) and np.array_equal(ds, (s * 1024 + d).astype(np.float32))
    assert np.array_equal(conv_ds_to_sd(ds, dim=320, state_len=3), sd)
    with pytest.raises(LayoutMismatch, match="SD->DS"):
        conv_sd_to_ds(ds, dim=320, state_len=3)


def test_conv_hf_width_drop_and_pad() -> None:
    hf = index_coded((320, 4), base=1024)[None]  # HF (B, dim, K): column 0 is the oldest input
    engine = conv_hf_to_ds(hf, dim=320, kernel=4)
    assert engine.shape == (1, 320, 3) and np.array_equal(engine, hf[..., 1:])
    back = conv_ds_to_hf(engine, dim=320, state_len=3)
    assert back.shape == (1, 320, 4) and not back[..., 0].any()
    assert np.array_equal(back[..., 1:], hf[..., 1:])
    assert np.array_equal(conv_hf_to_ds(back), engine)  # engine -> HF -> engine is exact
    with pytest.raises(LayoutMismatch, match="kernel width"):
        conv_hf_to_ds(np.zeros((8, 1), np.float32))
    with pytest.raises(LayoutMismatch, match="HF->DS"):
        conv_hf_to_ds(hf, kernel=5)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    h=st.integers(1, 6),
    v=st.integers(1, 24),
    k=st.integers(1, 24),
)
def test_ssm_round_trip_random_shapes(batch: list[int], h: int, v: int, k: int) -> None:
    a = np.random.default_rng(h * 1000 + v * 31 + k).standard_normal((*batch, h, v, k)).astype(np.float32)
    hkv = ssm_hvk_to_hkv(a, d_k=k, d_v=v)
    assert hkv.shape == (*batch, h, k, v)
    assert np.array_equal(hkv, np.swapaxes(a, -1, -2))
    assert np.array_equal(ssm_hkv_to_hvk(hkv, d_k=k, d_v=v), a)


@settings(max_examples=40, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), dim=st.integers(1, 40), kernel=st.integers(2, 6))
def test_conv_round_trips_random_shapes(batch: list[int], dim: int, kernel: int) -> None:
    hf = np.arange(np.prod([*batch, dim, kernel]), dtype=np.uint16).reshape(*batch, dim, kernel)
    ds = conv_hf_to_ds(hf)
    sd = conv_ds_to_sd(ds)
    assert sd.shape == (*batch, kernel - 1, dim) and sd.dtype == np.uint16
    assert np.array_equal(conv_sd_to_ds(sd), ds)
    padded = conv_ds_to_hf(ds)
    assert np.array_equal(padded[..., 1:], hf[..., 1:]) and not padded[..., 0].any()


def test_convert_tensor_between_specs() -> None:
    f2 = load_fixture("tiny-qwen3-next")
    conv_ds, ssm_hvk = _tensor(f2, 0, "gdn", "conv"), _tensor(f2, 0, "gdn", "ssm")
    conv_sd = _tensor(load_fixture("tiny-qwen3-next", conv_layout="conv:SD"), 0, "gdn", "conv")
    conv_hf = _tensor(load_fixture("tiny-qwen3-next", conv_layout="conv:HF"), 0, "gdn", "conv")
    ssm_hkv = _tensor(load_fixture("tiny-qwen3-next", ssm_layout="ssm:HKV"), 0, "gdn", "ssm")
    assert (conv_sd.shape, conv_hf.shape, ssm_hkv.shape) == ((3, 320), (320, 4), (4, 32, 48))

    state = index_coded(ssm_hvk.shape)
    hkv = convert_tensor(state, ssm_hvk, ssm_hkv)
    assert np.array_equal(hkv, np.swapaxes(state, 1, 2))
    assert np.array_equal(convert_tensor(hkv, ssm_hkv, ssm_hvk), state)

    conv = np.arange(320 * 3, dtype=np.uint16).reshape(320, 3)  # bf16 bits
    sd = convert_tensor(conv, conv_ds, conv_sd)
    assert np.array_equal(sd, conv.T)
    hf = convert_tensor(sd, conv_sd, conv_hf)
    assert np.array_equal(hf[:, 1:], conv) and not hf[:, 0].any()
    assert np.array_equal(convert_tensor(hf, conv_hf, conv_ds), conv)
    same = convert_tensor(conv, conv_ds, conv_ds)
    assert np.array_equal(same, conv) and not np.shares_memory(same, conv)

    k = _tensor(f2, 3, "gqa", "k")
    tokens = np.zeros((7, *k.shape), dtype=np.uint16)
    assert convert_tensor(tokens, k, k).shape == (7, 2, 64)


def test_convert_tensor_refusals() -> None:
    f2 = load_fixture("tiny-qwen3-next")
    conv, ssm = _tensor(f2, 0, "gdn", "conv"), _tensor(f2, 0, "gdn", "ssm")
    state = index_coded(ssm.shape)
    bf16_ssm = replace(ssm, dtype="bfloat16")
    with pytest.raises(LayoutMismatch, match="never cast"):
        convert_tensor(state, ssm, bf16_ssm)
    with pytest.raises(LayoutMismatch, match="dtype float64"):
        convert_tensor(state.astype(np.float64), ssm, ssm)
    with pytest.raises(LayoutMismatch, match="expected shape"):
        convert_tensor(state[:, :, :16], ssm, ssm)
    hkv = replace(ssm, layout="ssm:HKV", shape=(4, 32, 48))
    with pytest.raises(LayoutMismatch, match="expected shape"):
        convert_tensor(np.swapaxes(state, 1, 2).copy(), ssm, hkv)  # the array is not what from_spec says
    with pytest.raises(LayoutMismatch, match="no conversion"):
        convert_tensor(state, ssm, replace(ssm, layout="ssm:HPN"))
    with pytest.raises(LayoutMismatch, match="into"):
        convert_tensor(np.zeros(conv.shape, np.uint16), conv, replace(conv, name="ssm"))
    with pytest.raises(LayoutMismatch, match="reshard"):
        convert_tensor(np.zeros(conv.shape, np.uint16), conv, replace(conv, sub_projections=(320,)))
    with pytest.raises(LayoutMismatch, match="expected shape"):
        check_array(np.zeros((5, 2, 64), np.uint16), _tensor(f2, 3, "gqa", "k"), tokens=6)
