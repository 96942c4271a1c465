"""The profiler on a real tiny hybrid transformers model (CPU): curves, JSON, the planner reading them."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvwire.prfaas import model, profiler  # noqa: E402
from kvwire.prfaas.lengths import TruncatedLogNormal  # noqa: E402
from kvwire.prfaas.profile import ServedProfile  # noqa: E402

LENGTHS = (32, 512, 2048)


@pytest.fixture(scope="module")
def tiny() -> tuple[object, dict]:
    return profiler.tiny_hybrid(seed=0)


def test_profile_of_a_tiny_hybrid_model(tiny: tuple[object, dict], tmp_path) -> None:
    m, cfg = tiny
    assert cfg["layer_types"].count("linear_attention") == 3 * cfg["layer_types"].count("full_attention")
    prof = profiler.measure(m, cfg, LENGTHS, repeats=2)
    layout = profiler.layout_of(cfg)
    # KV: exactly kvwire's payload, affine in length (fixed GDN state + per-token attention KV)
    assert [int(b) for b in prof.kv.values] == [profiler.payload_bytes(layout, n) for n in LENGTHS]
    assert prof.kv(0) == pytest.approx(layout.state_bytes_per_request(), rel=1e-9)
    assert prof.kv(1000) - prof.kv(999) == pytest.approx(layout.kv_bytes_per_token())
    # prefill: measured, positive, and a 64x longer prompt takes longer (generous: the CPU is shared)
    assert all(s > 0 and math.isfinite(s) for s in prof.prefill.seconds)
    assert prof.prefill.seconds[-1] > 1.5 * prof.prefill.seconds[0]
    # JSON round trip, and the planner takes it
    path = tmp_path / "profile.json"
    prof.save(path)
    back = ServedProfile.load(path)
    assert back == prof
    dep = model.Deployment(back.prefill, back.prefill, back.kv, model.DecodeProfile(0.01, 8, 64), 1, 3,
                           b_out=1e8)
    best = model.plan(dep, TruncatedLogNormal(math.log(100), 0.8, 16, 1024))
    assert best.lam_max > 0 and best.n_p + best.n_d == 3


def test_the_layout_check_refuses_a_layout_of_another_model(tiny: tuple[object, dict]) -> None:
    """Negative control: the per-token check is what ties the profile's KV curve to the timed model."""
    m, cfg = tiny
    assert profiler.check_layout(m, profiler.layout_of(cfg), cfg["vocab_size"]) == 256  # 2 heads x 16 x K,V x 4 B
    wrong = profiler.layout_of({**cfg, "num_key_value_heads": 4})
    with pytest.raises(profiler.LayoutMismatchError):
        profiler.check_layout(m, wrong, cfg["vocab_size"])


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError):
        ServedProfile.from_json('{"format": "something else"}')
    with pytest.raises(ValueError):
        ServedProfile.from_json('{"format": "kvwire.prfaas.profile/1", "model": "m", "hardware": "h"}')
    with pytest.raises(ValueError):
        profiler.measure(None, {}, [128])
