"""Endpoint addresses as engine adapters take them: ``"host:port"``, ``"[v6addr]:port"`` or a ``(host, port)``
pair, parsed and checked the same way by every adapter.

Owns: ``split_endpoint`` (text or pair -> ``(host, port)``, brackets removed, port in 1..65535; ``ValueError`` for
a malformed address, ``TypeError`` for a value of the wrong type), ``join_endpoint`` (its inverse, brackets put
back around an IPv6 literal) and ``check_request_id`` (a kvwire request id as ``RequestSpec`` takes it: a string
of 1..256 characters). An unbracketed IPv6 literal with a port (``"::1:7400"``) is ambiguous and refused, unless
the caller says its engine joins host and port that way (``bare_ipv6=True``: the last colon splits; SGLang's
``bootstrap_addr`` is such a join). Must not know: any engine, or how the address is dialled (the host is not
resolved here: a name that does not resolve fails at connect time, as everywhere in kvwire).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..codec.layout import MAX_REQUEST_ID  # the longest request id ``RequestSpec`` takes (characters)

__all__ = ["MAX_REQUEST_ID", "check_request_id", "join_endpoint", "split_endpoint"]

_BAD_HOST_CHARS = frozenset("[]/@?#")


def _port(value: Any, text: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what}: the port must be an int or digits, not {type(value).__name__} ({text!r})")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"{what} must be 'host:port' or '[v6addr]:port' with a numeric port, not {text!r}")
        value = int(value)
    if not 1 <= value <= 65535:
        raise ValueError(f"{what}: port {value} out of range 1..65535 (in {text!r})")
    return value


def _host(host: str, text: Any, what: str, *, bracketed: bool) -> str:
    if not host:
        raise ValueError(f"{what} has no host: {text!r} (expected 'host:port' or '[v6addr]:port')")
    if any(c.isspace() or c in _BAD_HOST_CHARS for c in host):
        raise ValueError(f"{what}: {host!r} is not a host name or address (in {text!r})")
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address (in {text!r})") from None
    return host


def split_endpoint(value: Any, *, what: str = "endpoint", bare_ipv6: bool = False) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"``, ``"[v6addr]:port"`` or a ``(host, port)`` pair; the host without
    brackets, ready for ``socket``/``kvwire.connect``. ``what`` names the value in error messages.

    ``ValueError``: no port, a non-numeric port or one outside 1..65535, no host, unbalanced or misplaced
    brackets, a bracketed or colon-holding host that is not an IPv6 address, an unbracketed IPv6 literal
    (unless ``bare_ipv6``). ``TypeError``: neither a string nor a pair, or a pair of the wrong types."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what}: a (host, port) pair has 2 items, not {len(value)} ({value!r})")
        host, port = value
        if not isinstance(host, str):
            raise TypeError(f"{what}: the host must be a string, not {type(host).__name__} ({value!r})")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
        return _host(host[1:-1] if bracketed else host, value, what, bracketed=bracketed), _port(port, value, what)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a 'host:port' string or a (host, port) pair, not {type(value).__name__}"
                        f" ({value!r})")
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1:close + 2] != ":":
            raise ValueError(f"{what} must be '[v6addr]:port', not {value!r}")
        return _host(value[1:close], value, what, bracketed=True), _port(value[close + 2:], value, what)
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"{what} has no port: {value!r} (expected 'host:port' or '[v6addr]:port')")
    if ":" in host and not bare_ipv6:
        raise ValueError(f"{what}: an IPv6 address takes brackets, '[v6addr]:port', not {value!r}")
    return _host(host, value, what, bracketed=False), _port(port, value, what)


def join_endpoint(host: str, port: int) -> str:
    """``"host:port"``, or ``"[v6addr]:port"`` for an IPv6 literal: what ``split_endpoint`` reads back."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def check_request_id(value: Any, *, what: str = "request id") -> str:
    """``value`` if it is a kvwire request id (a string of 1..``MAX_REQUEST_ID`` characters): ``TypeError``
    for another type, ``ValueError`` for an empty or too long one."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    if not 0 < len(value) <= MAX_REQUEST_ID:
        raise ValueError(f"{what} must be 1..{MAX_REQUEST_ID} characters, not {len(value)}")
    return value
