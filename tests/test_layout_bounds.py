"""One set of layout rules, however a layout is built: in code (the dataclasses) or off the wire (from_dict).

Before, ``ModelLayout.from_dict`` refused a block_size, tp_size/tp_rank or name the wire cannot carry while
``ModelLayout(...)`` took them; ``CacheSpec`` took any window (2**64, -1 on a GQA cache, True), and a list
where a str belongs (kind, dtype, layout tag, page_layout) was a TypeError 'unhashable', not a LayoutError.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from kvwire.codec.layout import (
    MAX_BLOCKS,
    CacheSpec,
    LayerSpec,
    ModelLayout,
    RequestSpec,
    TensorSpec,
)
from kvwire.codec.presets import PRESETS, load_preset
from kvwire.codec.probe import probe_layout
from kvwire.errors import LayoutError
from kvwire.testing.fixtures import FIXTURES, load_fixture


def _kv(name: str = "k", **kw: Any) -> TensorSpec:
    return TensorSpec(name, (8, 128), "bfloat16", "NHD", "token", **kw)


def _layout(**kw: Any) -> ModelLayout:
    caches = (CacheSpec("swa", (_kv("k"), _kv("v")), 4096), CacheSpec("gqa", (_kv("k"), _kv("v"))))
    return ModelLayout("m", tuple(LayerSpec(i, (c,)) for i, c in enumerate(caches)), **kw)


# (what is built in code, how the same value is written into a good layout's wire form, what the error names)
Wire = Callable[[dict[str, Any]], None]


def _set(key: str, v: Any) -> Wire:
    return lambda d: d.__setitem__(key, v)


def _cache(i: int, v: Any) -> Wire:
    return lambda d: d["layers"][0][0].__setitem__(i, v)


def _tensor(i: int, v: Any) -> Wire:
    return lambda d: d["layers"][0][0][2][0].__setitem__(i, v)


CASES: list[tuple[str, Callable[[], Any], Wire | None, str]] = [
    ("block_size 0", lambda: _layout(block_size=0), _set("block_size", 0), "'block_size'"),
    ("block_size 2**20+1", lambda: _layout(block_size=2**20 + 1), _set("block_size", 2**20 + 1), "'block_size'"),
    ("block_size True", lambda: _layout(block_size=True), _set("block_size", True), "'block_size'"),
    ("block_size 16.0", lambda: _layout(block_size=16.0), _set("block_size", 16.0), "'block_size'"),
    ("tp_size 2**16+1", lambda: _layout(tp_size=2**16 + 1), _set("tp_size", 2**16 + 1), "'tp_size'"),
    ("tp_size 2**64", lambda: _layout(tp_size=2**64), None, "'tp_size'"),
    ("tp_rank 2**16", lambda: _layout(tp_size=2**17, tp_rank=2**16), None, "'tp_size'"),
    ("tp_rank -1", lambda: _layout(tp_rank=-1), _set("tp_rank", -1), "'tp_rank'"),
    ("name 257 chars", lambda: ModelLayout("x" * 257, ()), _set("name", "x" * 257), "'name'"),
    ("name None", lambda: ModelLayout(None, ()), _set("name", None), "'name'"),  # type: ignore[arg-type]
    ("page_layout list", lambda: _layout(page_layout=["kv_major"]), _set("page_layout", ["kv_major"]),
     "'page_layout'"),
    ("layers list", lambda: ModelLayout("m", [LayerSpec(0)]), None, "'layers'"),  # type: ignore[arg-type]
    ("layers of tuples", lambda: ModelLayout("m", ((0, ()),)), None, "'layers'"),  # type: ignore[arg-type]
    ("window 2**31+1", lambda: CacheSpec("swa", (_kv(),), 2**31 + 1), _cache(1, 2**31 + 1), "window"),
    ("window 2**64", lambda: CacheSpec("swa", (_kv(),), 2**64), _cache(1, 2**64 - 1), "window"),
    ("window -1 on gqa", lambda: CacheSpec("gqa", (_kv(),), -1), None, "window"),
    ("window True", lambda: CacheSpec("swa", (_kv(),), True), _cache(1, True), "window"),
    ("kind list", lambda: CacheSpec(["gqa"], (_kv(),)), _cache(0, ["swa"]), "cache kind"),  # type: ignore[arg-type]
    ("17 tensors", lambda: CacheSpec("gqa", tuple(_kv(str(i)) for i in range(17))),
     lambda d: d["layers"][0][0][2].extend([d["layers"][0][0][2][0]] * 16), "tensors"),
    ("tensors list", lambda: CacheSpec("gqa", [_kv()]), None, "tensors"),  # type: ignore[arg-type]
    ("5 caches", lambda: LayerSpec(0, (CacheSpec("gqa", (_kv(),)),) * 5),
     lambda d: d["layers"][0].extend([d["layers"][1][0]] * 4), "caches"),
    ("layer index -1", lambda: LayerSpec(-1), None, "layer index"),
    ("layer index '0'", lambda: LayerSpec("0"), None, "layer index"),  # type: ignore[arg-type]
    ("tensor name 257", lambda: _kv("x" * 257), _tensor(0, "x" * 257), "tensor name"),
    ("tensor name int", lambda: _kv(3), _tensor(0, 3), "tensor name"),  # type: ignore[arg-type]
    ("dtype list", lambda: TensorSpec("k", (8,), ["bfloat16"], "NHD", "token"),  # type: ignore[arg-type]
     _tensor(2, ["bfloat16"]), "dtype"),
    ("layout tag dict", lambda: TensorSpec("k", (8,), "bfloat16", {}, "token"),  # type: ignore[arg-type]
     _tensor(3, {}), "layout"),
    ("indexing list", lambda: TensorSpec("k", (8,), "bfloat16", "NHD", ["token"]),  # type: ignore[arg-type]
     _tensor(4, ["token"]), "indexing"),
    ("replicated 'no'", lambda: _kv(replicated="no"), _tensor(5, "no"), "replicated"),
    ("shape list", lambda: TensorSpec("k", [8, 128], "bfloat16", "NHD", "token"),  # type: ignore[arg-type]
     None, "shape"),
]


@pytest.mark.parametrize("built,wire,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_field_is_a_layout_error_naming_it_in_code_and_off_the_wire(
        built: Callable[[], Any], wire: Wire | None, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        built()
    if wire is not None:  # the same value in a layout's wire form: the same rule, the same error
        d = _layout().to_dict()
        wire(d)
        with pytest.raises(LayoutError, match=match):
            ModelLayout.from_dict(d)


REQUESTS: list[tuple[str, Callable[[], Any], dict[str, Any] | None, str]] = [
    ("num_tokens 2**64", lambda: RequestSpec("r", 2**64, 1), {"num_tokens": 2**64 - 1}, "num_tokens"),
    ("num_tokens 7.9", lambda: RequestSpec("r", 7.9, 1), {"num_tokens": 7.9}, "num_tokens"),  # type: ignore[arg-type]
    ("num_tokens '12'", lambda: RequestSpec("r", "12", 1), {"num_tokens": "12"}, "num_tokens"),  # type: ignore[arg-type]
    ("prefix_hit list", lambda: RequestSpec("r", 4, 4, []), {"prefix_hit": []}, "maps"),  # type: ignore[arg-type]
    ("prefix_hit group", lambda: RequestSpec("r", 4, 4, {"state": 1}), {"prefix_hit": {"state": 1}},
     "prefix hit group"),
    ("block_ids group", lambda: RequestSpec("r", 4, 4, block_ids={"bogus": (1,)}), {"block_ids": {"bogus": [1]}},
     "block_ids"),
    ("block_ids int", lambda: RequestSpec("r", 4, 4, block_ids={"attn": 3}), {"block_ids": {"attn": 3}},  # type: ignore[dict-item]
     "block_ids"),
    ("block id -1", lambda: RequestSpec("r", 4, 4, block_ids={"attn": (0, -1)}), {"block_ids": {"attn": [0, -1]}},
     "block ids of attn"),
    ("block id 1.5", lambda: RequestSpec("r", 4, 4, block_ids={"attn": (1.5,)}), {"block_ids": {"attn": [1.5]}},  # type: ignore[dict-item]
     "block id of attn"),
    ("block id 2**64", lambda: RequestSpec("r", 4, 4, block_ids={"attn": (2**64,)}), None, "block ids of attn"),
    ("too many block ids", lambda: RequestSpec("r", 4, 4, block_ids={"attn": (1,) * (MAX_BLOCKS // 2 + 1),
                                                                      "swa": (1,) * (MAX_BLOCKS // 2)}),
     {"block_ids": {"attn": [1] * (MAX_BLOCKS + 1)}}, "at most"),
]


@pytest.mark.parametrize("built,wire,match", [c[1:] for c in REQUESTS], ids=[c[0] for c in REQUESTS])
def test_a_bad_request_field_is_a_layout_error_in_code_and_off_the_wire(
        built: Callable[[], Any], wire: dict[str, Any] | None, match: str) -> None:
    """from_dict used to int() what it read (num_tokens 7.9 became 7, "12" became 12) and took negative block
    ids; RequestSpec built in code took any block_ids at all and num_tokens past what msgpack can carry."""
    with pytest.raises(LayoutError, match=match):
        built()
    if wire is not None:
        with pytest.raises(LayoutError, match=match):
            RequestSpec.from_dict({**RequestSpec("r", 4, 4).to_dict(), **wire})


def _every_layout() -> list[ModelLayout]:
    out = [load_preset(n) for n in PRESETS] + [load_preset(n, tp_size=2, tp_rank=1) for n in PRESETS[:4]]
    return out + [load_fixture(n) for n in FIXTURES] + [probe_layout(4), _layout(block_size=2**20, tp_size=2**16,
                                                                                   tp_rank=2**16 - 1)]


def test_every_built_in_layout_and_the_bounds_themselves_still_round_trip() -> None:
    """Negative control: every preset (TP1 and a TP2 rank), fixture and the probe layout, and a layout at every
    bound (window 2**31, 16 tensors, 4 caches, a 256-character name), are rebuilt equal off their wire form."""
    edge = ModelLayout("n" * 256, (LayerSpec(0, (CacheSpec("swa", tuple(_kv("t" * 250 + str(i)) for i in range(16)),
                                                           2**31),) * 4),), block_size=1)
    for layout in _every_layout() + [edge]:
        back = ModelLayout.from_dict(copy.deepcopy(layout.to_dict()))
        assert back == layout and back.fingerprint() == layout.fingerprint(), layout.name
    req = RequestSpec("r", 2**63 - 1, 2**63 - 1, {"attn": 5}, {"attn": [0, 2**63 - 1], "state": (3,)})  # type: ignore[dict-item]
    assert RequestSpec.from_dict(req.to_dict()) == req and req.block_ids == {"attn": (0, 2**63 - 1), "state": (3,)}
