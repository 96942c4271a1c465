"""What a ``kvwire-bench -s`` server lets a client ask of it with ``-R`` (the server sends; a keyless server takes
anyone's request): its payload buffers come out of ``--pool-bytes``, ``--model`` is a preset name or a
config.json sent by value (never a path on the server), amounts and deadlines are bounded, and ``-C`` names
only an algorithm the kernel allows. Each attack runs beside a legitimate request that still works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvwire import Receiver
from kvwire.bench.control import client_connect
from kvwire.bench.errors import UsageError
from kvwire.bench.options import Options
from kvwire.bench.reverse import bound_request, run_reverse_client
from kvwire.sockopts import allowed_congestion_algorithms

MiB = 1 << 20
RAW = {"requests": 1, "lanes": 1, "adaptive": False, "duration": None, "interval": 0.0}


def _vm(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))


def _reverse(address: tuple[str, int], opts: dict[str, Any], data_port: int, model_config: str | None = None,
             wait: float = 10.0) -> tuple[dict[str, Any], float]:
    """Ask for a reverse test with raw ``opts`` (what a hostile client may send), answer the server's requests
    as a receiving client does, and return the first ``rstart``/``reverse_failed``/``error`` and its delay."""
    ch, _ = client_connect(*address, b"k", None, 3.0)
    try:
        t0 = time.monotonic()
        ch.tell("reverse", data_port=data_port, opts=dict(RAW, **opts), model_config=model_config)
        while time.monotonic() - t0 < wait:
            try:
                m = ch.recv(timeout=1.0)
            except TimeoutError:
                continue
            op = m["op"]
            if op == "ping":
                ch.tell("pong", t0=m.get("t0"), ts=time.monotonic())
            elif op == "prepare":
                ch.tell("prepared", fresh=0, seconds=0.0)
            elif op == "start":
                ch.tell("started", ts=time.monotonic())
            elif op in ("rstart", "reverse_failed", "error"):
                return m, time.monotonic() - t0
        return {"op": "nothing"}, time.monotonic() - t0
    finally:
        ch.close()


def _refusing_receiver() -> Receiver:
    def refuse(_manifest: Any) -> Any:
        raise RuntimeError("this test takes no payload")

    return Receiver("127.0.0.1", 0, key=b"k", allocator=refuse)


def _legit(address: tuple[str, int], **kw: Any) -> dict[str, Any]:
    """A reverse test as ``kvwire-bench -c -R`` runs one (one request unless told)."""
    kw.setdefault("requests", 1)
    kw.setdefault("interval", 0.0)
    o = Options(mode="client", host=address[0], port=address[1], key=b"k", lanes=1, adaptive=False, timeout=30.0,
                **kw)
    doc, _ = run_reverse_client(o)
    return doc


# ---------------------------------------------------------------- buffers: the server's --pool-bytes


def test_reverse_payloads_come_out_of_the_server_pool(bench_server: tuple[str, int]) -> None:
    """The fixture's server holds a 64 MiB pool. Asking it to send 4 x 128 MiB made it allocate and fault
    in 512 MiB (the reviewer measured 4 x 512 MiB against a 16 MiB pool: RSS 2.1 GiB; 64 x 8 GiB would take
    the host down): it is refused now, before anything is allocated. A request that fits runs verified."""
    rx = _refusing_receiver()
    try:
        hwm = _vm("self", "VmHWM")
        m, took = _reverse(bench_server, {"length": 128 * MiB, "concurrency": 4}, rx.address[1])
        grown = _vm("self", "VmHWM") - hwm
    finally:
        rx.close()
    print(f"\nreverse 4 x 128 MiB against a 64 MiB pool: {m['op']} in {took:.2f} s, peak RSS +{grown / MiB:.0f} MiB")
    assert m["op"] == "reverse_failed" and m["exit_code"] == UsageError.exit_code, m
    assert "pool" in m["reason"] and grown < 64 * MiB
    doc = _legit(bench_server, length=4 * MiB, concurrency=2, requests=2)  # 2 x 4 MiB: fits
    assert doc["kv"]["verification"]["verified"] and doc["kv"]["payload_bytes"] == 2 * 4 * MiB


# ---------------------------------------------------------------- --model: never a path on the server


@pytest.fixture
def limited_server() -> Iterator[tuple[str, int]]:
    """A server in a child process under a 3 GiB address-space limit (an attack that reads /dev/zero must hit it
    there, not in pytest), key ``k``, 16 MiB pool."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from kvwire.bench.server import BenchServer, ServerConfig\n"
            "s = BenchServer(ServerConfig(bind='127.0.0.1', port=0, data_port=0, key=b'k', pool_bytes=16 << 20),"
            " log=lambda _: None)\nprint('PORT', s.address[1], flush=True)\ns.serve()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        yield "127.0.0.1", int(p.stdout.readline().split()[1])
    finally:
        p.kill()
        p.wait(10)


def test_reverse_model_is_never_opened_as_a_server_path(limited_server: tuple[str, int], tmp_path: Path) -> None:
    """model="/dev/zero" made the server read until MemoryError, a FIFO blocked its handler forever (every later
    client was told "server busy"), and the error texts told which server files exist. Each is refused at
    once with one text, and the next client gets in; a preset and a config.json sent by value still work."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reasons = set()
    rx = _refusing_receiver()
    try:
        for model in ("/dev/zero", str(fifo), "/etc/passwd", str(tmp_path / "absent.json"), str(tmp_path)):
            m, took = _reverse(limited_server, {"model": model, "tokens": 16}, rx.address[1], wait=3.0)
            print(f"\nreverse --model {model}: {m['op']} in {took:.2f} s")
            assert m["op"] == "reverse_failed" and m["exit_code"] == UsageError.exit_code, (model, m)
            assert took < 1.0
            reasons.add(m["reason"])
            _admitted(limited_server)  # the slot is free again
    finally:
        rx.close()
    assert len(reasons) == 1 and "preset" in reasons.pop()
    assert _legit(limited_server, model="llama-3-70b", tokens=16)["kv"]["verification"]["verified"]
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    from kvwire.codec.presets import preset_config

    config.write_text(__import__("json").dumps(dict(preset_config("llama-3-70b"), num_hidden_layers=2)))
    for model in (str(config), str(config.parent)):  # a directory sends its config.json
        doc = _legit(limited_server, model=model, tokens=16)
        assert doc["kv"]["verification"]["verified"] and doc["kv"]["model"] == model


def _admitted(address: tuple[str, int]) -> None:
    """A new client gets the test slot (the server ends a refused test just after it answers; a client that
    comes at once waits for that, server.SLOT_WAIT at most)."""
    ch, _ = client_connect(*address, b"k", None, 5.0)
    ch.close()


# ---------------------------------------------------------------- -C: only what the kernel allows


def test_reverse_congestion_is_limited_to_the_allowed_algorithms(bench_server: tuple[str, int]) -> None:
    """A root server set TCP_CONGESTION to whatever the client named (the kernel may then load the module
    tcp_<name>) after dialling the client. A name outside tcp_allowed_congestion_control is refused first."""
    allowed = allowed_congestion_algorithms()
    if not allowed:
        pytest.skip("no /proc/sys/net/ipv4/tcp_allowed_congestion_control here")
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        m, took = _reverse(bench_server, {"length": MiB, "congestion": "kvwire_nope"}, listener.getsockname()[1],
                           wait=6.0)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):  # refused before the server dialled the data port
            listener.accept()[0].close()
    finally:
        listener.close()
    assert m["op"] == "reverse_failed" and m["exit_code"] == UsageError.exit_code and "allow" in m["reason"], m
    doc = _legit(bench_server, length=MiB, congestion=allowed[0])
    assert doc["kv"]["verification"]["verified"]


def test_reverse_with_an_interval_too_short_to_sample_is_refused(bench_server: tuple[str, int]) -> None:
    """The sending server runs the sampler at the client's -i: ``interval`` 1e-9 would make its sampler thread
    spin for the whole test. The server checks the client's options as the command line does (``check``) and
    refuses it before dialling; negative control: the floor is taken."""
    from kvwire.bench.options import MIN_INTERVAL

    rx = _refusing_receiver()
    try:
        m, took = _reverse(bench_server, {"length": MiB, "interval": 1e-9}, rx.address[1], wait=3.0)
    finally:
        rx.close()
    assert m["op"] == "reverse_failed" and m["exit_code"] == UsageError.exit_code and "-i must be" in m["reason"], m
    assert took < 1.0
    doc = _legit(bench_server, length=MiB, interval=MIN_INTERVAL)
    assert doc["kv"]["verification"]["verified"]


# ---------------------------------------------------------------- how long one client may hold the slot


def _opts(**kw: Any) -> Options:
    return Options(mode="client", **kw)


@pytest.mark.parametrize("kw, match", [({"duration": 10.0**9}, "-t"), ({"requests": 10**9}, "--requests"),
                                       ({"timeout": 10.0**6}, "--timeout"), ({"connect_timeout": 10.0**6}, "connect"),
                                       ({"timeout": float("nan")}, "--timeout"), ({"interval": "x"}, "-i"),
                                       ({"model": ["llama-3-70b"]}, "preset")])
def test_reverse_amounts_and_deadlines_are_bounded(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        bound_request(_opts(**kw), None)


def test_reverse_bounds_take_ordinary_requests() -> None:
    bound_request(_opts(), None)
    bound_request(_opts(duration=60.0, timeout=300.0, model="qwen3-next-80b-a3b"), None)
    bound_request(_opts(requests=1000, model="raw", congestion=""), '{"model_type": "llama"}')
    with pytest.raises(UsageError, match="model_config"):
        bound_request(_opts(), "x" * (2 << 20))


def test_reverse_stops_starting_requests_at_the_server_bound(bench_server: tuple[str, int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No request starts after reverse.MAX_SECONDS of a test, whatever --requests (or -n) asks: here 1 s
    instead of 3600, for a client asking 100000 small requests."""
    import kvwire.bench.reverse as reverse

    monkeypatch.setattr(reverse, "MAX_SECONDS", 1.0)
    t0 = time.monotonic()
    doc = _legit(bench_server, length=64 * 1024, requests=100_000, concurrency=1)
    took = time.monotonic() - t0
    n = doc["kv"]["requests"] if isinstance(doc["kv"].get("requests"), int) else len(doc.get("requests") or [])
    print(f"\nreverse --requests 100000 under a 1 s bound: {took:.1f} s, {n} requests")
    assert took < 15 and doc["kv"]["verification"]["verified"]
