"""The adapters' shared endpoint parser (``kvwire.adapters.endpoints``): every good form next to the bad ones
it must refuse, the port range, brackets, SGLang's bare-IPv6 joins, and request ids as ``RequestSpec``
takes them. Engine-free: it runs everywhere."""

from __future__ import annotations

from typing import Any

import pytest

from kvwire.adapters.endpoints import MAX_REQUEST_ID, check_request_id, join_endpoint, split_endpoint
from kvwire.codec.layout import RequestSpec
from kvwire.errors import LayoutError

GOOD: list[tuple[Any, tuple[str, int]]] = [
    ("10.0.0.7:7400", ("10.0.0.7", 7400)),
    ("decode-host:7400", ("decode-host", 7400)),
    ("decode.example.com:1", ("decode.example.com", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:7400", ("::1", 7400)),
    ("[2001:db8::5]:80", ("2001:db8::5", 80)),
    ("[fe80::1%eth0]:7400", ("fe80::1%eth0", 7400)),
    (("10.0.0.7", 7400), ("10.0.0.7", 7400)),
    (["::1", 7400], ("::1", 7400)),  # a pair from JSON: a list; the IPv6 host bare
    (("[::1]", "7400"), ("::1", 7400)),
]

BAD_VALUE: list[Any] = [
    "decode-host",  # no port
    "decode-host:",  # empty port
    ":7400",  # no host
    "h:abc",
    "h:-1",
    "h:+80",
    "h: 80",
    "h:٧٤",  # non-ASCII digits
    "h:0",  # out of range
    "h:65536",
    "h:99999999999999999999",
    "::1:7400",  # an unbracketed IPv6 literal with a port is ambiguous
    "[::1]",  # no port
    "[::1]7400",
    "[::1:7400",
    "[]:7400",
    "[decode-host]:7400",  # brackets are for IPv6 literals
    "[10.0.0.1]:7400",
    "de code:7400",
    "user@host:7400",
    "a]:7400",
    "",
    ("h", 0),
    ("", 7400),
    ("h", 1, 2),
]

BAD_TYPE: list[Any] = [None, 7400, b"h:7400", ("h", None), ("h", 7400.0), ("h", True), (5, 7400)]


@pytest.mark.parametrize("value,expected", GOOD, ids=repr)
def test_good_forms_parse(value: Any, expected: tuple[str, int]) -> None:
    assert split_endpoint(value) == expected
    host, port = expected
    assert split_endpoint(join_endpoint(host, port)) == expected  # the inverse round-trips


@pytest.mark.parametrize("value", BAD_VALUE, ids=repr)
def test_bad_forms_raise_value_error_naming_the_value(value: Any) -> None:
    with pytest.raises(ValueError, match="kvwire_endpoint") as e:
        split_endpoint(value, what="kvwire_endpoint")
    assert not isinstance(e.value, LayoutError)


@pytest.mark.parametrize("value", BAD_TYPE, ids=repr)
def test_wrong_types_raise_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        split_endpoint(value)


def test_port_bounds_and_their_negative_controls() -> None:
    assert split_endpoint("h:1") == ("h", 1) and split_endpoint("h:65535") == ("h", 65535)
    for bad in ("h:0", "h:65536"):
        with pytest.raises(ValueError, match="out of range 1..65535"):
            split_endpoint(bad)


def test_bare_ipv6_only_where_the_engine_joins_that_way() -> None:
    """SGLang joins ``f"{host}:{port}"`` with a bare IPv6 host: the last colon splits there, and only there."""
    with pytest.raises(ValueError, match="brackets"):
        split_endpoint("::1:8998")
    assert split_endpoint("::1:8998", bare_ipv6=True) == ("::1", 8998)
    assert split_endpoint("2001:db8::5:8998", bare_ipv6=True) == ("2001:db8::5", 8998)
    assert split_endpoint("[::1]:8998", bare_ipv6=True) == ("::1", 8998)
    assert split_endpoint("host:8998", bare_ipv6=True) == ("host", 8998)
    with pytest.raises(ValueError, match="not an IPv6 address"):
        split_endpoint("a:b:8998", bare_ipv6=True)


def test_join_brackets_ipv6_only() -> None:
    assert join_endpoint("::1", 7400) == "[::1]:7400"
    assert join_endpoint("[::1]", 7400) == "[::1]:7400"
    assert join_endpoint("10.0.0.7", 7400) == "10.0.0.7:7400"
    assert join_endpoint("decode-host", 7400) == "decode-host:7400"


def test_request_ids_as_request_spec_takes_them() -> None:
    for rid in ("r", "req-42", "x" * MAX_REQUEST_ID):
        assert check_request_id(rid) == rid
        RequestSpec(rid, 2, 1)  # the same bound as the wire's: a checked id never fails later
    with pytest.raises(ValueError):
        check_request_id("")
    with pytest.raises(ValueError):
        check_request_id("x" * (MAX_REQUEST_ID + 1))
    with pytest.raises(LayoutError):
        RequestSpec("x" * (MAX_REQUEST_ID + 1), 2, 1)
    for bad in (5, None, b"r", ["r"]):
        with pytest.raises(TypeError):
            check_request_id(bad)
