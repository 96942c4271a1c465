"""The front door's byte tokenizer, streaming decoder and stop matcher; its settings table."""

from __future__ import annotations

import pytest

from kvwire.prfaas.config import ConfigError
from kvwire.prfaas.settings import FrontSettings
from kvwire.prfaas.tokenizer import ByteTokenizer, StopMatcher, StreamDecoder, TokenizerError


def test_bytes_round_trip_and_ids_past_the_bytes() -> None:
    t = ByteTokenizer()
    ids = t.encode("héllo ✓")
    assert ids == list("héllo ✓".encode()) and t.decode(ids) == "héllo ✓"
    assert t.decode([104, 300, 105]) == "h<|300|>i"
    with pytest.raises(TokenizerError, match="token 1"):
        t.check([1, 256])
    assert t.check([1, 511], vocab=512) == [1, 511]
    for bad in ([], [1, -1], [True], [1.0]):
        with pytest.raises(TokenizerError):
            t.check(bad, vocab=512)


def test_stream_decoder_never_splits_a_character() -> None:
    d = StreamDecoder()
    pieces = [d.feed([b]) for b in "é✓".encode()]
    assert pieces == ["", "é", "", "", "✓"] and d.flush() == ""
    d = StreamDecoder()
    assert d.feed([0xC3]) == "" and d.flush() == "\ufffd"  # cut mid-character: replaced, not dropped


def test_stop_matcher_hides_the_stop_sequence_and_holds_only_what_could_start_it() -> None:
    t = ByteTokenizer()
    m = StopMatcher([t.encode("END")])
    shown = [x for b in t.encode("abEfEND tail") for x in m.feed(b)]
    assert bytes(shown) == b"abEf" and m.stopped and m.flush() == []
    m = StopMatcher([t.encode("END")])
    shown = [x for b in t.encode("xEN") for x in m.feed(b)]
    assert bytes(shown) == b"x" and not m.stopped and bytes(m.flush()) == b"EN"  # ended without the stop


def test_router_settings_are_validated() -> None:
    s = FrontSettings.from_table({"port": 1234, "t_star": 100, "use_link": False, "loop": {"t_max": 4096}})
    assert s.t_star == 100.0 and s.loop.t_max == 4096 and not s.use_link
    for bad in ({"nope": 1}, {"port": 0}, {"t_star": "x"}, {"use_link": 1}, {"loop": {"up": 0.5}},
                {"replan_s": -1.0}):
        with pytest.raises(ConfigError):
            FrontSettings.from_table(bad)
