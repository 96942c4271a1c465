"""A ``kvwire-bench -c`` client facing a broken or hostile server: a real ``BenchServer`` (in a thread here) whose
messages are patched to lie about one field, and the real client (``python -m kvwire.bench`` in a subprocess,
where the exit code and stderr matter; ``main`` in-process where its Requester is inspected).

Before, such a server crashed the client with a traceback (``summary.cpu_user="lots"``: ValueError in
``document.py``; a WELCOME ``data_port`` of 0: the raw ValueError of ``check_port``; a ``-R`` result without
its document: KeyError 'start'), or was believed (``result.ok="no"`` counted as verified; a NaN clock in
``pong`` made every layer time NaN), and results under request ids the client never issued were all kept
(400 of 1 MiB grew its RSS by 400 MB). Now a field of the wrong type or out of range is a PeerError naming it
("server sent a bad summary.cpu_user: ...", exit code 3, no traceback); one that arrives after the test started
leaves the document of what was measured in place, as a server that vanishes mid-test does; results for ids
the client did not issue are dropped and other unasked-for messages are bounded.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

import kvwire.bench.server as server_mod
from kvwire.bench import main
from kvwire.bench import requester as requester_mod
from kvwire.bench.control import BenchChannel
from kvwire.bench.errors import EXIT_UNREACHABLE
from kvwire.bench.server import BenchServer, ServerConfig

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: what the patched server sends instead of one message: ``(op, fields) -> [(op, fields), ...]``
Lie = Callable[[str, dict[str, Any]], list[tuple[str, dict[str, Any]]]]


@pytest.fixture
def lying_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """``start(lie=None, welcome=None)``: a real BenchServer on 127.0.0.1 whose bench messages go through ``lie``
    and whose WELCOME has ``welcome`` merged in; returns its control port. (``BenchChannel.tell`` is patched in
    this process only: the subprocess client's own messages are its own.)"""
    running: list[tuple[BenchServer, threading.Thread]] = []

    def start(lie: Lie | None = None, welcome: dict[str, Any] | None = None) -> int:
        if lie is not None:
            real_tell = BenchChannel.tell

            def tell(self: BenchChannel, op: str, **fields: Any) -> None:
                for op2, fields2 in lie(op, dict(fields)):
                    real_tell(self, op2, **fields2)

            monkeypatch.setattr(BenchChannel, "tell", tell)
        if welcome is not None:
            real_hs = server_mod.server_handshake
            monkeypatch.setattr(server_mod, "server_handshake",
                                lambda ch, key, w, deadline: real_hs(ch, key, {**w, **welcome}, deadline))
        server = BenchServer(ServerConfig(bind="127.0.0.1", port=0, data_port=0, pool_bytes=1 << 30),
                             log=lambda _: None)
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()
        running.append((server, t))
        return server.address[1]

    yield start
    for server, t in running:
        server.close()
        t.join(10)


def setting(target: str, path: tuple[Any, ...], value: Any) -> Lie:
    """A server that sets ``path`` (keys and indices into the message's fields) to ``value`` in every ``target``
    message it sends."""

    def lie(op: str, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if op == target:
            fields = copy.deepcopy(fields)
            here = fields
            for step in path[:-1]:
                here = here[step]
            here[path[-1]] = value
        return [(op, fields)]

    return lie


def adding(after: str, *extra: tuple[str, dict[str, Any]]) -> Lie:
    """A server that sends ``extra`` messages right after each ``after`` message."""

    def lie(op: str, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [(op, fields), *extra] if op == after else [(op, fields)]

    return lie


def client(port: int, tiny_config: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvwire.bench", "-c", "127.0.0.1", "-p", str(port), "--model",
                           tiny_config, "--tokens", "2000", "--requests", "2", "-P", "2", "--no-adaptive", "-i", "0",
                           *args], capture_output=True, text=True, timeout=120, env=ENV)


def assert_peer_error(r: subprocess.CompletedProcess[str], field: str) -> None:
    """Exit code 3 (PeerError), the field named (on stderr; with -J an error before the test is the one JSON
    object on stdout), no traceback."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == EXIT_UNREACHABLE, (r.returncode, r.stderr[-2000:], r.stdout[-1000:])
    assert f"server sent a bad {field}" in r.stderr + r.stdout, (r.stderr[-2000:], r.stdout[-1000:])


# ---------------------------------------------------------------- after the test started: the document stays

LATE = [
    ("summary", ("cpu_user",), "lots", "summary.cpu_user"),  # ValueError at document.py:113
    ("summary", ("cpu_user",), None, "summary.cpu_user"),  # TypeError there
    ("summary", ("verify_cpu",), [1], "summary.verify_cpu"),
    ("summary", ("lanes",), [{"socket": [1, 2], "bytes": 5}], "summary.lanes[0].socket"),  # unhashable, :118
    ("summary", ("lanes",), 5, "summary.lanes"),  # 'int' object is not iterable
    ("summary", ("last_verified",), math.nan, "summary.last_verified"),  # a NaN goodput in the document
    ("summary", ("last_verified",), 0.0, "summary.last_verified"),  # the server's boot: receive time 1e-9 s
    ("summary", ("last_verified",), 1e9, "summary.last_verified"),  # decades after the test
    ("result", ("layers",), [[0, 0.0]], "result.layers of"),  # an exposed tail of minus the uptime
    ("result", ("layers",), [["x", 1.0]], "result.layers[0][0]"),  # ValueError at document.py:39
    ("result", ("layers",), 5, "result.layers"),
    ("result", ("ok",), "no", "result.ok"),  # bool("no"): counted as verified
    ("result", ("rid",), 5, "result.rid"),  # queued as a reply: "answered 'result' where 'summary' ..."
    ("result", ("layers",), [[0, 1.0]] * 5000, "result.layers"),  # more layers than any layout: kept whole
]


@pytest.mark.parametrize(("op", "path", "value", "field"), LATE, ids=[f"{c[3]}={c[2]!r}"[:60] for c in LATE])
def test_a_bad_field_after_the_start_keeps_the_document_and_exits_with_a_peer_error(
        lying_server: Callable[..., int], tiny_config: str, op: str, path: tuple[Any, ...], value: Any,
        field: str) -> None:
    port = lying_server(setting(op, path, value))
    r = client(port, tiny_config, "-J")
    assert_peer_error(r, field)
    doc = json.loads(r.stdout)  # one document: what was measured, as with a server that vanished mid-test
    kv = doc["kv"]
    assert kv["timeline"] and all(t["transport_state"] == "done" for t in kv["timeline"]), kv["timeline"]
    assert not kv["verification"]["verified"]
    assert f"server sent a bad {field}" in kv["verification"]["session_error"], kv["verification"]
    assert doc["end"]["sum_sent"]["bytes"] > 0


def test_text_output_also_keeps_the_summary_and_names_the_field(lying_server: Callable[..., int],
                                                                tiny_config: str) -> None:
    port = lying_server(setting("summary", ("cpu_user",), "lots"))
    r = client(port, tiny_config)
    assert_peer_error(r, "summary.cpu_user")
    assert "[SUM]" in r.stdout and "session: no summary from the server: server sent a bad summary.cpu_user" \
        in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------- before the test: a clear refusal

EARLY = [
    ({"data_port": 0}, "welcome.data_port"),  # raw ValueError "port must be in 1..65535" from check_port
    ({"data_port": 70000}, "welcome.data_port"),
    ({"data_port": -5}, "welcome.data_port"),
    ({"data_port": "5212"}, "welcome.data_port"),
    ({"server": b"\x00\x01"}, "welcome.server"),  # bytes in the -J document: json.dumps TypeError
]


@pytest.mark.parametrize(("welcome", "field"), EARLY, ids=[f"{f}={w[f.split('.')[1]]!r}" for w, f in EARLY])
def test_a_bad_welcome_is_a_peer_error_naming_the_field(lying_server: Callable[..., int], tiny_config: str,
                                                        welcome: dict[str, Any], field: str) -> None:
    port = lying_server(welcome=welcome)
    r = client(port, tiny_config, "-J")
    assert_peer_error(r, field)
    assert json.loads(r.stdout)["error"].startswith(f"server sent a bad {field}")


def test_a_pong_with_a_nan_clock_is_a_peer_error(lying_server: Callable[..., int], tiny_config: str) -> None:
    """Before, NaN became the clock offset and every verified-at time in the document was NaN."""
    port = lying_server(setting("pong", ("ts",), math.nan))
    r = client(port, tiny_config, "-J")
    assert_peer_error(r, "pong.ts")


# ---------------------------------------------------------------- -R: the server's events and document


def _partial_doc() -> dict[str, Any]:
    return {"start": {"test_start": {}}, "end": {"cpu_utilization_percent": {}}, "kv": {}}


REVERSE = [
    (setting("reverse_done", ("doc",), {}), "reverse_done.doc.start"),  # KeyError 'start' at reverse.py:166
    (setting("reverse_done", ("doc",), _partial_doc()), "reverse_done.doc."),  # KeyError 'remote_total'
    (setting("rstart", ("info",), [1, 2]), "rstart.info"),  # TypeError at reverse.py:143
    (setting("reverse_done", ("doc", "end", "cpu_utilization_percent", "remote_total"), "x"),
     "reverse_done.doc.end.cpu_utilization_percent.remote_total"),  # ValueError formatting the summary
    (setting("reverse_done", ("doc", "kv", "timeline", 1, "layers"), []), "reverse_done.doc.kv"),  # IndexError
    (setting("reverse_done", ("series",), [[0.0]]), "reverse_done.series[0]"),  # ValueError unpacking, --plot
    (adding("rstart", ("rinterval", {"rec": {"streams": [], "sum": {"start": 0.0}}})),
     "rinterval.rec.sum.end"),  # KeyError 'end' printing the interval
    (adding("rstart", ("rrequest", {"rec": {}})), "rrequest.rec.request_id"),  # KeyError 'state'
]


@pytest.mark.parametrize(("lie", "field"), REVERSE, ids=[c[1] for c in REVERSE])
def test_reverse_a_bad_event_or_document_is_a_peer_error(lying_server: Callable[..., int], tiny_config: str,
                                                         tmp_path: Any, lie: Lie, field: str) -> None:
    plot = ("--plot", str(tmp_path / "run.png")) if "series" in field else ()
    if plot:
        pytest.importorskip("matplotlib")
    port = lying_server(lie)
    r = client(port, tiny_config, "-R", *plot)
    assert_peer_error(r, field)


# ---------------------------------------------------------------- memory: what a server may make the client hold


@pytest.fixture
def requesters(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Requester made in this process (the in-process client's), to look at once the run is over."""
    made: list[Any] = []
    real_init = requester_mod.Requester.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(requester_mod.Requester, "__init__", init)
    return made


def test_results_for_request_ids_the_client_did_not_issue_are_dropped(
        lying_server: Callable[..., int], tiny_config: str, requesters: list[Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before each real result the server sends 100 of 256 KiB under made-up request ids: all of them were kept
    (the trial's 400 x 1 MiB grew the client's RSS from 115 to 515 MB). Now only the client's own are."""
    pad = "x" * (256 << 10)

    def lie(op: str, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if op != "result":
            return [(op, fields)]
        return [("result", {**fields, "rid": f"junk{i}", "pad": pad}) for i in range(100)] + [(op, fields)]

    port = lying_server(lie)
    rc = main(["-c", "127.0.0.1", "-p", str(port), "--model", tiny_config, "--tokens", "2000", "--requests", "2",
               "-P", "2", "--no-adaptive", "-i", "0", "-J"])
    out = capsys.readouterr()
    assert rc == 0, out.err  # the run itself is fine: the junk is simply not the client's
    assert json.loads(out.out)["kv"]["verification"]["verified"]
    (req,) = requesters
    assert len(req.results) == 2 and not any(rid.startswith("junk") for rid in req.results), len(req.results)
    assert req.dropped == 200


def test_unasked_for_messages_are_bounded(lying_server: Callable[..., int], tiny_config: str,
                                          requesters: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    """After ``started`` the server sends 200 more ``started`` nobody asked for: all of them were queued. Now at
    most MAX_UNANSWERED (16) wait; past that the server is a bad peer (exit 3), and the document stays."""
    port = lying_server(adding("started", *[("started", {"ts": 0.0, "pad": "y" * 4096})] * 200))
    rc = main(["-c", "127.0.0.1", "-p", str(port), "--model", tiny_config, "--tokens", "2000", "--requests", "2",
               "-P", "2", "--no-adaptive", "-i", "0", "-J"])
    out = capsys.readouterr()
    (req,) = requesters
    assert req._replies.qsize() <= 16 + 1, req._replies.qsize()
    assert rc == EXIT_UNREACHABLE, out.err
    assert "messages nobody asked for" in out.err and "Traceback" not in out.err, out.err
    assert "messages nobody asked for" in json.loads(out.out)["kv"]["verification"]["session_error"]


def test_a_kept_result_holds_only_its_fields_and_a_large_reply_is_refused(
        lying_server: Callable[..., int], tiny_config: str, requesters: list[Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each real result carries 1 MiB more under a field nobody reads: the client kept it whole until the end
    of the test (a result per request, 4 MiB each at most). Now a kept result holds its known fields only.
    Then a ``summary`` padded to 1 MiB (a reply is a few KiB): refused as a bad peer, the document kept."""
    port = lying_server(setting("result", ("pad",), "z" * (1 << 20)))
    rc = main(["-c", "127.0.0.1", "-p", str(port), "--model", tiny_config, "--tokens", "2000", "--requests", "2",
               "-P", "2", "--no-adaptive", "-i", "0", "-J"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    (req,) = requesters
    assert len(req.results) == 2 and all("pad" not in r for r in req.results.values()), \
        [sorted(r) for r in req.results.values()]
    assert all(r["ok"] and r["layers"] for r in req.results.values())

    port = lying_server(setting("summary", ("pad",), "z" * (1 << 20)))
    rc = main(["-c", "127.0.0.1", "-p", str(port), "--model", tiny_config, "--tokens", "2000", "--requests", "2",
               "-P", "2", "--no-adaptive", "-i", "0", "-J"])
    out = capsys.readouterr()
    assert rc == EXIT_UNREACHABLE and "'summary' message of" in out.err and "Traceback" not in out.err, out.err
    assert json.loads(out.out)["kv"]["timeline"]


# ---------------------------------------------------------------- negative controls: an honest server


def _wire(x: Any) -> Any:
    """As it arrives: through msgpack, as the control channel carries it."""
    return msgpack.unpackb(msgpack.packb(x, use_bin_type=True), raw=False)


def test_an_honest_server_gives_the_same_document(lying_server: Callable[..., int], tiny_config: str) -> None:
    """Every message an honest server sends reads back unchanged (so the document is what it was), and the
    runs pass, forward and -R."""
    from kvwire.bench import messages

    sent: list[tuple[str, dict[str, Any]]] = []

    def record(op: str, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        sent.append((op, _wire(fields)))
        return [(op, fields)]

    port = lying_server(record)
    fwd = client(port, tiny_config, "-J")
    assert fwd.returncode == 0 and "Traceback" not in fwd.stderr, fwd.stderr
    doc = json.loads(fwd.stdout)
    assert doc["kv"]["verification"]["verified"] and doc["kv"]["verification"]["session_error"] == ""
    rev = client(port, tiny_config, "-J", "-R")
    assert rev.returncode == 0 and "Traceback" not in rev.stderr, rev.stderr
    rdoc = json.loads(rev.stdout)
    assert rdoc["kv"]["verification"]["verified"]

    ops = {op for op, _ in sent}
    assert {"summary", "result", "pong", "rstart", "reverse_done"} <= ops, ops
    for op, fields in sent:
        msg = {"op": op, **fields}
        if op == "summary":
            assert messages.read_summary(msg) == fields
        elif op == "result":
            assert messages.read_result(msg) == fields
        elif op == "pong":
            assert messages.read_pong(msg) == fields["ts"]
        elif op == "rstart":
            assert messages.read_rstart(msg) == fields["info"]
        elif op == "rinterval":
            assert messages.read_interval(msg) == fields["rec"]
        elif op == "rrequest":
            assert messages.read_request(msg) == fields["rec"]
        elif op == "reverse_done":
            got, series = messages.read_reverse_done(msg)
            assert got == fields["doc"] and series == []
            # the client printed the server's document, as before (its own end of it swapped in)
            assert rdoc["kv"]["timeline"] == got["kv"]["timeline"]
            assert rdoc["end"]["sum_received"] == got["end"]["sum_received"]
    summary = next(f for op, f in sent if op == "summary")
    assert doc["kv"]["cpu"]["receiver_verify_s"] == summary["verify_cpu"]
    assert doc["kv"]["receiver_memory"]["rss_peak"] == summary["rss_peak"]


# ---------------------------------------------------------------- -R: a server that never finishes


def test_reverse_an_unknown_message_is_a_peer_error(lying_server: Callable[..., int], tiny_config: str) -> None:
    """Before, ignored: one within each peer timeout kept the client waiting for good."""
    port = lying_server(adding("rstart", ("surprise", {})))
    r = client(port, tiny_config, "-R")
    assert_peer_error(r, "reverse test message: op 'surprise'")


def test_reverse_relay_ends_at_its_deadline_however_busy_the_server_keeps_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers nothing but keeps the channel alive (heartbeats, pings: each one the receiving side
    answers and waits on) is given up at the relay deadline; before, ``serve`` looped for as long as it chose."""
    import socket
    import time

    from kvwire.bench import reverse
    from kvwire.bench.options import Options
    from kvwire.bench.receiving import ReceiverConfig, ReceivingSide

    mine, theirs = socket.socketpair()
    ch, server = BenchChannel(mine, "server"), BenchChannel(theirs, "client")
    ch.authenticated()
    side = ReceivingSide(ReceiverConfig(bind="127.0.0.1", data_port=0, pool_bytes=1 << 20), log=lambda _: None)
    stop = threading.Event()

    def busy() -> None:
        while not stop.wait(0.05):
            try:
                server.tell("ping", t0=time.monotonic())
                server.tell("hb")
            except OSError:
                return

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    test, _ = side.open_test("r1", ch, "server")
    assert test is not None
    monkeypatch.setattr(reverse, "relay_deadline", lambda o: 1.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(reverse.PeerGone, match="did not finish the reverse test within 1.5 s"):
            reverse._relay(Options(mode="client"), ch, side, test, None, None, None)
        assert time.monotonic() - t0 < 10, "the relay outlived its deadline by far"
    finally:
        stop.set()
        side.end_test(test)
        side.close()
        mine.close()
        theirs.close()
        t.join(5)


def test_reverse_relay_deadline_covers_the_test_and_its_last_transfer() -> None:
    from kvwire.bench import reverse
    from kvwire.bench.options import Options

    o = Options(mode="client", duration=5.0, timeout=10.0)
    assert reverse.relay_deadline(o) == 5.0 + 10.0 + reverse.RELAY_GRACE
    unbounded = Options(mode="client", duration=None, timeout=1e9)  # the sending side's own bounds apply
    assert reverse.relay_deadline(unbounded) == reverse.MAX_SECONDS + reverse.MAX_TIMEOUT + reverse.RELAY_GRACE
