"""Shared fixtures: every test must leave no kvwire thread and no socket behind."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from helpers import kvwire_threads, open_fds, wait_until


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
