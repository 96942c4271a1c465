"""Shared fixtures: every test must leave no kvwire thread and no socket behind; ``uncaught`` collects what
escaped a thread."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from helpers import kvwire_threads, open_fds, wait_until

import kvwire


@pytest.fixture
def no_leaks() -> Iterator[None]:
    fds, threads = open_fds(), Counter(kvwire_threads())
    yield

    def new_threads() -> list[str]:  # threads of an earlier test that end meanwhile are not this test's leak
        return sorted((Counter(kvwire_threads()) - threads).elements())

    assert wait_until(lambda: not new_threads(), 10), f"threads left: {new_threads()}"
    assert wait_until(lambda: open_fds() <= fds, 10), f"fds: {open_fds()} after vs {fds} before"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, accepted)."""
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    srv.close()
    try:
        yield cli, acc
    finally:
        cli.close()
        acc.close()


@pytest.fixture
def bench_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A kvwire-bench server (key ``k``, 64 MiB pool) on its own thread; ``request.param`` is the bind address
    (``indirect`` parametrization), 127.0.0.1 by default."""
    import threading

    from kvwire.bench.server import BenchServer, ServerConfig

    bind = getattr(request, "param", "127.0.0.1")
    server = BenchServer(ServerConfig(bind=bind, port=0, data_port=0, key=b"k", pool_bytes=64 << 20),
                         log=lambda _: None)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        yield server.address
    finally:
        server.close()
        t.join(5)


@pytest.fixture
def link(no_leaks: None) -> Iterator[tuple[kvwire.Receiver, kvwire.Session]]:
    """A keyed loopback receiver and a 2-lane session to it (peer timeout 3 s), closed after the test."""
    rx = kvwire.Receiver("127.0.0.1", 0, key=b"k", peer_timeout=3.0)
    session = kvwire.connect("127.0.0.1", rx.address[1], lanes=2, key=b"k", peer_timeout=3.0)
    try:
        yield rx, session
    finally:
        session.close()
        rx.close()


@pytest.fixture
def uncaught() -> Iterator[list[BaseException]]:
    """Exceptions that escaped any thread while the test ran (``threading.excepthook``)."""
    seen: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)  # type: ignore[assignment,arg-type,return-value]
    try:
        yield seen
    finally:
        threading.excepthook = old


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen3-Next fixture's config.json (GDN + GQA, 8 layers) as a --model path."""
    from kvwire.testing.fixtures import FIXTURES

    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(FIXTURES["tiny-qwen3-next"].config))
    return str(path)
