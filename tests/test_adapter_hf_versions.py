"""kvwire.adapters.transformers across transformers releases: the forward's cache keyword is read off its
signature (``cache`` since 5.24, ``past_key_values`` / ``cache_params`` before), a cache the forward did not
fill is refused with a LayoutMismatch naming the installed version, and a version outside
``VERIFIED_TRANSFORMERS`` warns (``UntestedTransformersWarning``) at the adapter's first call."""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import prompt, tiny_model  # noqa: E402

from kvwire.adapters.transformers import (  # noqa: E402
    VERIFIED_TRANSFORMERS,
    PrefillStream,
    UntestedTransformersWarning,
    cache_kwargs,
    expect_cache,
    hf_layout,
)
from kvwire.codec.layout import RequestSpec  # noqa: E402
from kvwire.errors import LayoutMismatch, TransferCancelled  # noqa: E402


class _Both(torch.nn.Module):  # both names: the newer one wins
    def forward(self, input_ids: Any, cache: Any = None, past_key_values: Any = None) -> None: ...


class _Mamba(torch.nn.Module):
    def forward(self, input_ids: Any, cache_params: Any = None) -> None: ...


class _NoCache(torch.nn.Module):
    def forward(self, input_ids: Any) -> None: ...


def _set_version(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    # the module object itself: transformers swaps its sys.modules entry once a model is built
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


def _in_range(version: str) -> bool:
    major, minor = (int(x) for x in version.split(".")[:2])
    return VERIFIED_TRANSFORMERS[0] <= (major, minor) <= VERIFIED_TRANSFORMERS[1]


def test_cache_kwargs_reads_the_forward_signature() -> None:
    """The keyword a real model's forward names fills the cache given (on every verified release); the newer
    name wins over an alias; a forward with no cache keyword is a typed error naming the version."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    named = inspect.signature(model.forward).parameters
    assert list(kw) == ["cache" if "cache" in named else "past_key_values"]
    with torch.no_grad():
        model(prompt(5), use_cache=True, **kw)
    assert cache.layers[0].keys.shape[2] == 5  # the model filled our cache, not one of its own
    assert list(cache_kwargs(_Both(), cache)) == ["cache"]
    assert list(cache_kwargs(_Mamba(), cache)) == ["cache_params"]
    with pytest.raises(LayoutMismatch, match=f"takes none of .*transformers {transformers.__version__}"):
        cache_kwargs(_NoCache(), cache)


def test_a_cache_the_forward_did_not_fill_is_refused(link: Any) -> None:
    """What transformers 5.24 did to the old adapter (the model ignored the keyword and built its own cache):
    the first layer's hook raises LayoutMismatch naming the version, and the transfer ends cancelled."""
    from transformers import DynamicCache

    rx, session = link
    model = tiny_model("jamba")
    layout = hf_layout(model)
    incoming = expect_cache(rx, model, "ignored", 8)
    transfer = session.send(layout, RequestSpec("ignored", num_tokens=8, state_position=8), timeout=10)
    unused = DynamicCache(config=model.config)
    with pytest.raises(LayoutMismatch, match=f"holds no .*transformers {transformers.__version__}, kvwire verified"):
        with PrefillStream(model, transfer, layout, unused), torch.no_grad():
            model(prompt(8), use_cache=True)  # no cache keyword: the model fills a cache of its own
    with pytest.raises(TransferCancelled, match="LayoutMismatch"):
        incoming.cache(10)


@pytest.mark.parametrize("version", ["5.99.0", "6.0.0.dev0", "4.57.1", "5.16.1"])
def test_untested_version_warns_at_the_first_call(link: Any, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    rx, _ = link
    model = tiny_model("llama")
    _set_version(monkeypatch, version)
    with pytest.warns(UntestedTransformersWarning, match=f"transformers {version} is outside .* verified on "
                                                         r"\(5\.17-5\.24\)"):
        incoming = expect_cache(rx, model, f"v{version}", 6)
    incoming.cancel()


def test_verified_versions_do_not_warn(link: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rx, _ = link
    model = tiny_model("llama")
    assert _in_range(transformers.__version__), "the installed transformers is outside VERIFIED_TRANSFORMERS"
    for i, version in enumerate([transformers.__version__, "5.17.0", "5.24.3"]):
        _set_version(monkeypatch, version)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UntestedTransformersWarning)
            expect_cache(rx, model, f"ok{i}", 6).cancel()
