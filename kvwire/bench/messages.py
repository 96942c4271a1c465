"""The messages a kvwire-bench peer sends, read with types: one reader per message, used where it arrives.

Owns: the shape of every bench message a side reads from its peer (``welcome``, ``pong``, ``result``,
``summary``, the reason of ``error``/``reverse_failed``, and the ``-R`` events ``rstart``, ``rinterval``,
``rrequest`` and ``reverse_done`` with its run document and lane series) as small specs, and checking a
message against its spec. Each field this side reads is checked for its type and range (numbers finite
unless said otherwise, ints not bools, texts bounded); every other value must be plain JSON data, so that
``-J`` can print it. A broken or hostile peer gets a ``BadMessage`` naming the field ("server sent a bad
summary.cpu_user: expected a number, got str 'lots'") instead of a TypeError deep in a report. Must not
know: sockets, sessions, or what the fields are used for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..codec import parity
from ..codec.frames import DEFAULT_LIMITS
from ..codec.layout import MAX_REQUEST_ID
from ..codec.messages import MAX_REASON
from ..codec.transfer import State
from .errors import BadMessage

#: nesting of plain data a peer may send (the run document is 5 deep)
MAX_DEPTH = 32
#: characters of a peer's name for things (congestion algorithm, server version, hosts) kept
MAX_NAME = 256
#: layers a result may name (the frame limits' segments: the largest preset has 176)
MAX_LAYERS = DEFAULT_LIMITS.max_segments


class _Bad(Exception):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, why)
        self.path, self.why = path, why


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class Spec:
    """What one value must be; ``check`` returns it (maybe normalised) or raises ``_Bad``."""

    def check(self, v: Any, path: str) -> Any:
        raise NotImplementedError


class Plain(Spec):
    """Any plain JSON data: None, bool, int, float, str, lists and maps with string keys, nested at most
    ``MAX_DEPTH`` deep (no bytes: ``-J`` could not print them)."""

    def check(self, v: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise _Bad(path, f"nested deeper than {MAX_DEPTH}")
        if v is None or type(v) in (bool, int, float, str):
            return v
        if type(v) is list:
            for i, x in enumerate(v):
                self.check(x, f"{path}[{i}]", depth + 1)
            return v
        if type(v) is dict:
            for k, x in v.items():
                if type(k) is not str:
                    raise _Bad(path, f"a map key must be a string, got {_show(k)}")
                self.check(x, f"{path}.{k}", depth + 1)
            return v
        raise _Bad(path, f"expected plain data, got {type(v).__name__}")


PLAIN = Plain()


class Num(Spec):
    """A real number (an int or a float, not a bool), never NaN; infinite only when ``finite`` is False."""

    def __init__(self, lo: float | None = None, finite: bool = True) -> None:
        self.lo, self.finite = lo, finite

    def check(self, v: Any, path: str) -> Any:
        if type(v) not in (int, float):
            raise _Bad(path, f"expected a number, got {_show(v)}")
        if math.isnan(v) or (self.finite and math.isinf(v)):
            raise _Bad(path, f"expected a finite number, got {v!r}")
        if self.lo is not None and v < self.lo:
            raise _Bad(path, f"must be at least {self.lo:g}, got {v!r}")
        return v


class Int(Spec):
    """An int (not a bool) in ``lo..hi``."""

    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi

    def check(self, v: Any, path: str) -> Any:
        if type(v) is not int:
            raise _Bad(path, f"expected an int, got {_show(v)}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            lo = "" if self.lo is None else self.lo
            hi = "" if self.hi is None else self.hi
            raise _Bad(path, f"must be in {lo}..{hi}, got {v}")
        return v


class Bool(Spec):
    def check(self, v: Any, path: str) -> Any:
        if type(v) is not bool:
            raise _Bad(path, f"expected true or false, got {_show(v)}")
        return v


class Str(Spec):
    """A string of at most ``max_len`` characters (``cut``: a longer one is cut there instead), matching
    ``pattern`` or one of ``choices`` when given."""

    def __init__(self, max_len: int = MAX_NAME, cut: bool = False, pattern: str | None = None,
                 choices: tuple[str, ...] | None = None) -> None:
        self.max_len, self.cut, self.choices = max_len, cut, choices
        self.pattern = re.compile(pattern) if pattern is not None else None

    def check(self, v: Any, path: str) -> Any:
        if type(v) is not str:
            raise _Bad(path, f"expected a string, got {_show(v)}")
        if len(v) > self.max_len:
            if not self.cut:
                raise _Bad(path, f"longer than {self.max_len} characters ({len(v)})")
            v = v[:self.max_len]
        if self.pattern is not None and not self.pattern.fullmatch(v):
            raise _Bad(path, f"{v[:40]!r} is not of the form {self.pattern.pattern}")
        if self.choices is not None and v not in self.choices:
            raise _Bad(path, f"{v[:40]!r} is not one of {', '.join(self.choices)}")
        return v


class Opt(Spec):
    """None, or what ``inner`` says."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, v: Any, path: str) -> Any:
        return None if v is None else self.inner.check(v, path)


class ListOf(Spec):
    """A list of ``item``s, at most ``max_len`` of them when given."""

    def __init__(self, item: Spec, max_len: int | None = None) -> None:
        self.item, self.max_len = item, max_len

    def check(self, v: Any, path: str) -> Any:
        if type(v) is not list:
            raise _Bad(path, f"expected a list, got {_show(v)}")
        if self.max_len is not None and len(v) > self.max_len:
            raise _Bad(path, f"more than {self.max_len} items ({len(v)})")
        return [self.item.check(x, f"{path}[{i}]") for i, x in enumerate(v)]


class Pair(Spec):
    """A list of exactly two: ``[first, second]``."""

    def __init__(self, first: Spec, second: Spec) -> None:
        self.first, self.second = first, second

    def check(self, v: Any, path: str) -> Any:
        if type(v) is not list or len(v) != 2:
            raise _Bad(path, f"expected a pair, got {_show(v)}")
        return [self.first.check(v[0], f"{path}[0]"), self.second.check(v[1], f"{path}[1]")]


class Map(Spec):
    """A map with the ``required`` keys and maybe the ``optional`` ones, each as its spec says; any other key
    holds plain data (``keep_others`` False: it is left out of what ``check`` returns, so a map that is kept
    holds no more than its known fields). ``rule``: a check across fields (returns what is wrong, or None)."""

    def __init__(self, required: Mapping[str, Spec] | None = None, optional: Mapping[str, Spec] | None = None,
                 rule: Callable[[dict[str, Any]], str | None] | None = None, keep_others: bool = True) -> None:
        self.required, self.optional, self.rule = dict(required or {}), dict(optional or {}), rule
        self.keep_others = keep_others

    def check(self, v: Any, path: str) -> Any:
        if type(v) is not dict:
            raise _Bad(path, f"expected a map, got {_show(v)}")
        out = dict(v) if self.keep_others else {}
        for key, spec in self.required.items():
            if key not in v:
                raise _Bad(f"{path}.{key}", "missing")
            out[key] = spec.check(v[key], f"{path}.{key}")
        for key, spec in self.optional.items():
            if key in v:
                out[key] = spec.check(v[key], f"{path}.{key}")
        for key, x in v.items() if self.keep_others else ():
            if key not in self.required and key not in self.optional:
                PLAIN.check({key: x}, path)
        if self.rule is not None and (why := self.rule(out)) is not None:
            raise _Bad(path, why)
        return out


def read(who: str, name: str, body: Any, spec: Spec) -> Any:
    """``body`` (message ``name``, or a field of one: "reverse_done.doc") as ``spec`` says, or BadMessage
    "<who> sent a bad <name>.<field>: <what is wrong>"."""
    try:
        return spec.check(body, name)
    except _Bad as e:
        raise BadMessage(f"{who} sent a bad {e.path}: {e.why}") from None
    except RecursionError:
        raise BadMessage(f"{who} sent a bad {name}: nested too deep") from None


def _fields(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "op"}


# ---------------------------------------------------------------- the messages

NUM, NAT, INT, TEXT = Num(), Int(lo=0), Int(), Str()
SECONDS = Num(lo=0.0)
REASON = Str(MAX_REASON, cut=True)

#: the server's announcement in the handshake (besides ``service`` and ``bench``, checked on their own)
WELCOME = Map({"data_port": Int(1, 65535), "run": Str(64, pattern=r"[A-Za-z0-9_.-]+")},
              {"server": Opt(TEXT), "pool_bytes": Opt(NAT)})
PONG = Map({"ts": NUM})
#: a refusal (``error``) or a failed reverse test (``reverse_failed``): the reason, cut to MAX_REASON
REFUSAL = Map(optional={"reason": REASON, "exit_code": Opt(INT)})
#: the receiving side's verdict on one request (``layers``: [layer, verified at, its monotonic clock]; at most
#: MAX_LAYERS of them). A result is kept until the end of the test: only these fields are.
RESULT = Map({"rid": Str(MAX_REQUEST_ID), "ok": Bool(), "state": Str(choices=tuple(s.value for s in State))},
             {"reason": REASON, "bad_blocks": Opt(NAT), "first_bad": Opt(Int(lo=-1)),
              "layers": Opt(ListOf(Pair(NAT, NUM), MAX_LAYERS)), "bytes": NAT, "checked": NAT,
              "begun": Opt(NUM), "verify_cpu": SECONDS}, keep_others=False)
SUMMARY = Map(optional={
    "lanes": Opt(ListOf(Map({"socket": NAT, "bytes": NAT}, {"sockets": NAT}))),
    "cpu_user": SECONDS, "cpu_system": SECONDS, "verify_cpu": SECONDS,
    "last_verified": Opt(NUM), "congestion": TEXT,
    "rss_peak": Opt(NAT), "rss_base": Opt(NAT), "pool_bytes": Opt(NAT),
    "parity": Opt(Map(optional={k: Opt(NAT) for k in parity.COUNTERS}))})

# -R: what the sending server tells the receiving client
_PROBE = Map(optional={"seconds": NUM, "bytes_sent": Opt(NUM), "notes": Opt(ListOf(Str(MAX_REASON, cut=True)))})
_CONNECTED = Map({"socket": INT, "local_host": TEXT, "local_port": INT, "remote_host": TEXT, "remote_port": INT})
RSTART_INFO = Map({"connected": ListOf(_CONNECTED), "tokens": NAT, "bytes_per_request": NUM,
                   "congestion": Opt(TEXT)}, {"probe": Opt(_PROBE), "link_control": Opt(Map())})
_SPAN = {"start": NUM, "end": NUM, "bytes": NUM, "bits_per_second": NUM, "retransmits": INT, "rtt": PLAIN,
         "snd_cwnd": PLAIN}
_LINK = Map(optional={"pacing": Opt(NUM), "mode": TEXT})
INTERVAL = Map({"streams": ListOf(Map({"socket": INT, **_SPAN})), "sum": Map({**_SPAN, "active_lanes": PLAIN})},
               {"link": Opt(_LINK)})
REQUEST = Map({"request_id": TEXT, "state": TEXT, "reason": REASON})
SERIES = Opt(ListOf(Pair(NUM, ListOf(NUM))))


def _same_layer_count(kv: dict[str, Any]) -> str | None:
    counts = {len(t["layers"]) for t in kv["timeline"]}
    return None if len(counts) <= 1 else f"its timelines have different numbers of layers ({sorted(counts)})"


def _memory_parts(mem: dict[str, Any]) -> str | None:
    if mem["rss_peak"] is not None and mem["pool_bytes"] is not None and mem["beyond_pool"] is None:
        return "beyond_pool missing beside rss_peak and pool_bytes"
    return None


_LAYER = Map({"layer": NAT, "kinds": ListOf(TEXT), "bytes": NUM, "produced_ms": Opt(NUM), "verified_ms": Opt(NUM)})
_TIMELINE = Map({"request_id": TEXT, "verified": Bool(), "exposed_tail_ms": Opt(NUM), "layers": ListOf(_LAYER)})
_SENDER = Map({"socket": INT, "end": NUM, "bytes": NUM, "bits_per_second": NUM, "retransmits": INT})
_PERCENT = {f"{side}_{part}": NUM for side in ("host", "remote") for part in ("total", "user", "system")}
_EMULATED = Map({"rtt_ms": NUM, "loss": NUM, "rate_mbit": NUM, "queue_bytes": NUM, "mtu": PLAIN,
                 "client_addr": PLAIN, "server_addr": PLAIN})
#: the run document of a reverse test (``reverse_done.doc``): every field the client's report, plot and exit
#: status read
DOC = Map({
    "start": Map({"test_start": Map()}, {"emulated_link": Opt(_EMULATED)}),
    "intervals": ListOf(INTERVAL),
    "end": Map({"streams": ListOf(Map({"sender": _SENDER})),
                "sum_sent": Map({"end": NUM, "bytes": NUM, "bits_per_second": NUM, "retransmits": INT}),
                "sum_received": Map({"end": NUM, "bytes": NUM, "bits_per_second": NUM, "seconds": NUM}),
                "cpu_utilization_percent": Map(_PERCENT)}),
    "kv": Map({
        "mode": TEXT, "timeline": ListOf(_TIMELINE),
        "layout": Map({"num_layers": NAT, "tp_size": NAT}),
        "tokens": NAT, "bytes_per_request": NUM, "requests": NAT, "lanes": NAT, "concurrency": NAT,
        "prefill_ms_per_layer": NUM, "goodput_bits_per_second": NUM, "payload_bytes": NUM, "wire_bytes": NUM,
        "hash": TEXT, "chunk_size": NUM, "clock_uncertainty_s": Num(finite=False),
        "cpu": Map({"sender_s": NUM, "receiver_s": NUM, "sender_fill_s": NUM, "receiver_verify_s": NUM,
                    "cpu_s_per_gb": Opt(NUM)}),
        "exposed_tail_ms": Map({"p50": Opt(NUM), "p99": Opt(NUM)}),
        "receiver_memory": Map({"rss_peak": Opt(NUM), "pool_bytes": Opt(NUM), "beyond_pool": Opt(NUM)},
                               rule=_memory_parts),
        "verification": Map({"verified": Bool(), "requests_ok": NAT, "requests_failed": NAT,
                             "bytes_verified": NUM, "bytes_expected": NUM, "failures": ListOf(Str(4096, cut=True)),
                             "session_error": Str(64 * 1024, cut=True)}),
    }, {"tail_parity": Opt(Map({"per_group": INT, **{k: Opt(NAT) for k in parity.COUNTERS}})),
        "link_control": Opt(Map(optional={"pacing": Opt(NUM)}))},
        rule=_same_layer_count),
})


def read_welcome(welcome: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """The handshake's announcement: ``data_port`` (1..65535), ``run`` (the request ids' prefix: letters,
    digits, ``_.-``), ``server``, ``pool_bytes``."""
    return dict(read(who, "welcome", welcome, WELCOME))


def read_pong(msg: dict[str, Any], who: str = "server") -> float:
    """``pong``'s ``ts``: the peer's monotonic clock, a finite number."""
    return float(read(who, "pong", _fields(msg), PONG)["ts"])


def read_reason(msg: dict[str, Any], who: str = "server") -> str:
    """An ``error``'s (or ``reverse_failed``'s) reason, cut to MAX_REASON characters; "?" when none."""
    return str(read(who, str(msg.get("op")), _fields(msg), REFUSAL).get("reason", "?"))


def read_result(msg: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """A request's ``result``."""
    return dict(read(who, "result", _fields(msg), RESULT))


def read_summary(msg: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """The receiving side's ``summary`` (lanes, CPU, memory, parity counters, last verified time)."""
    return dict(read(who, "summary", _fields(msg), SUMMARY))


def read_rstart(msg: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """``rstart``'s ``info``: the sending server's set-up (connected lanes, tokens, bytes per request ...)."""
    return dict(read(who, "rstart.info", msg.get("info"), RSTART_INFO))


def read_interval(msg: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """``rinterval``'s ``rec``: one interval as the sending server's sampler closed it."""
    return dict(read(who, "rinterval.rec", msg.get("rec"), INTERVAL))


def read_request(msg: dict[str, Any], who: str = "server") -> dict[str, Any]:
    """``rrequest``'s ``rec``: one request as the sending server finished it."""
    return dict(read(who, "rrequest.rec", msg.get("rec"), REQUEST))


def read_reverse_done(msg: dict[str, Any], who: str = "server") -> tuple[dict[str, Any], list[Any]]:
    """``reverse_done``: the run document and the lane byte series ([] when none was asked for)."""
    doc = read(who, "reverse_done.doc", msg.get("doc"), DOC)
    series = read(who, "reverse_done.series", msg.get("series"), SERIES)
    return doc, series or []


__all__ = ["read", "read_interval", "read_pong", "read_reason", "read_request", "read_result",
           "read_reverse_done", "read_rstart", "read_summary", "read_welcome"]
