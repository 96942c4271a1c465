"""Every PrfaaS uvicorn server (the nodes' control API, the front door): what a connection waiting for its next
request head may hold.

Owns: ``server``, the ``uvicorn.Server`` each of them runs, and ``gated_protocol``, the uvicorn HTTP protocol
class (``uvicorn.Config(http=<class>)``) it serves with. A connection is *waiting* from the moment it is accepted
until a request head has been parsed, and again from each response's end (once the client has taken it: writing
not paused) until the next head (the keep-alive gap); while it waits it holds a ticket in a
``kvwire.tcp.HandshakeGate``: it must complete the head within ``HEAD_SECONDS`` of the start of the wait
(uvicorn's own keep-alive timer is reset by every byte, so a client dribbling a head, or sending none, was held
for ever), at most ``MAX_WAITING`` connections wait at once, at most half of them from one source address, and a
new connection always gets in: the gate cuts (aborts) the oldest waiting connection of the source holding the
most. So idle or half-sent connections can hold at most ``MAX_WAITING`` of a node's ``limit_concurrency`` slots
(before: 300 idle sockets took all 256 and every signed request got uvicorn's 503), and a new connection is never
refused by them. A connection whose request is being served is not waiting: the app bounds that (``controlauth``:
a signed body within ``signing.body_seconds``), and so does ``WRITE_STALL_SECONDS``: a connection whose client
reads none of its responses for that long (the transport's buffer over its high-water mark all the while) is
aborted; keyless pipelined ``GET /health``s a client never read held a served connection, and a slot, for ever.

The HTTP/1.1 implementation is pinned to h11 (uvicorn's hard dependency) rather than ``http="auto"``, which
picks httptools when it happens to be importable: one parser whatever else is installed, the one tested. The
gate touches only what both of uvicorn's implementations share (``cycle``, ``pipeline`` where there is one,
``data_received``, ``on_response_complete``, ``logger``), so ``gated_protocol(cuts, base=HttpToolsProtocol)`` works too
(the tests run it on both when httptools is importable).
Websockets are off (``ws="none"``): no PrfaaS route uses them, and an upgraded connection leaves the protocol
that holds its ticket.

Each server counts what it cuts (``Cuts``, by ``REASONS``): a head past its deadline, a waiting connection evicted
for a newer one, a write stall, a request refused over ``limit_concurrency`` (uvicorn's 503; its own warning,
one line per refused request, is not written: an attacker would write the log), a request past ``per_source``
(the front door's: one source address served at once, at most) and a 408 answer (the apps' body
deadlines: ``controlauth``, ``frontdoor.read_json``). The counts are the ``prfaas_http_cuts_total{server,
reason}`` counters of the ``kvwire.metrics.Metrics`` the server is given, and one warning sums them up at most
every ``LOG_SECONDS`` (a flood of cuts writes one line a minute, not one a cut).
Must not know: routes, signatures, what the apps serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..metrics import Metrics
from ..tcp import HandshakeGate, Ticket

__all__ = ["HEAD_SECONDS", "HTTP_PROTOCOL", "LOG_SECONDS", "MAX_WAITING", "METRIC", "REASONS", "WRITE_STALL_SECONDS",
           "Cuts", "GatedServer", "gated_protocol", "server"]

log = logging.getLogger("kvwire.prfaas.httpgate")

#: s a connection has to send a whole request head, from its accept or its previous response's end
HEAD_SECONDS = 5.0
#: the HTTP/1.1 implementation every server runs (pinned; see above)
HTTP_PROTOCOL: type[asyncio.Protocol] = H11Protocol
#: s a connection's responses may sit unread (writing paused: the transport's buffer past its high-water mark)
#: before it is aborted
WRITE_STALL_SECONDS = 10.0
#: connections waiting for a request head at once (at most half from one source address): of a node's 256
#: ``limit_concurrency`` slots, the other 192 are left to requests being served
MAX_WAITING = 64
#: s between two warnings about a server's cuts, at least (the first after a quiet spell is written at once)
LOG_SECONDS = 60.0
#: the counter family every server's cuts are exported as, labelled ``server`` and ``reason``
METRIC = "prfaas_http_cuts_total"
#: why a connection or request was cut (the ``reason`` label)
REASONS = ("head_deadline", "evicted", "write_stall", "over_limit", "body_deadline", "source_limit")
#: what uvicorn logs for each request it refuses over ``limit_concurrency`` (counted as ``over_limit`` instead)
_OVER_LIMIT = "Exceeded concurrency limit."


class Cuts:
    """What one server (``name``: ``"node"``, ``"frontdoor"``) cut, by reason: the gate counts head deadlines
    and evictions, this the rest; ``noted`` after each cut (on the event loop) schedules the warning."""

    def __init__(self, name: str, gate: HandshakeGate) -> None:
        self.name, self.gate = name, gate
        self.write_stall = self.over_limit = self.body_deadline = self.source_limit = 0
        self._logged = dict.fromkeys(REASONS, 0)
        self._next = 0.0  # monotonic time the next warning may be written
        self._pending: asyncio.TimerHandle | None = None

    def counts(self) -> dict[str, int]:
        return {"head_deadline": self.gate.expired, "evicted": self.gate.evicted, "write_stall": self.write_stall,
                "over_limit": self.over_limit, "body_deadline": self.body_deadline,
                "source_limit": self.source_limit}

    def export(self, metrics: Metrics) -> None:
        """Each reason's count as a ``METRIC`` sample of ``metrics``, read at each scrape."""
        for reason in REASONS:
            metrics.counter(METRIC, "Connections or requests a PrfaaS HTTP server cut, by reason.",
                            partial(self._count, reason), server=self.name, reason=reason)

    def _count(self, reason: str) -> int:
        return self.counts()[reason]

    def noted(self, loop: asyncio.AbstractEventLoop) -> None:
        """A cut was counted: the warning is written now, or when ``LOG_SECONDS`` have passed since the last."""
        if self._pending is None:
            self._pending = loop.call_later(max(0.0, self._next - time.monotonic()), self._warn)

    def _warn(self) -> None:
        self._pending = None
        now = self.counts()
        new = {r: now[r] - self._logged[r] for r in REASONS if now[r] > self._logged[r]}
        if new:
            self._logged, self._next = now, time.monotonic() + LOG_SECONDS
            log.warning("%s HTTP server cut %d connection(s) or request(s) since the last warning (%s); %s so far "
                        "(next warning in %.0f s at the earliest)", self.name, sum(new.values()),
                        ", ".join(f"{r} {n}" for r, n in new.items()), sum(now.values()), LOG_SECONDS)


class _Quiet:
    """uvicorn's protocol logger without its warning for each request refused over ``limit_concurrency``: that
    one is counted (``Cuts.over_limit``) and summed up in ``Cuts``' warning instead."""

    def __init__(self, logger: logging.Logger, cuts: Cuts, loop: asyncio.AbstractEventLoop) -> None:
        self._logger, self._cuts, self._loop = logger, cuts, loop

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == _OVER_LIMIT and not args:
            self._cuts.over_limit += 1
            self._cuts.noted(self._loop)
            return
        self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class _Gated:
    """Mixed in before a uvicorn HTTP protocol class: holds a gate ticket while the connection waits for a head."""

    gate: HandshakeGate
    cuts: Cuts
    # the uvicorn protocol's own attributes this relies on
    transport: asyncio.Transport
    client: tuple[str, int] | None
    cycle: Any
    loop: asyncio.AbstractEventLoop
    logger: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._ticket: Ticket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_stall: asyncio.TimerHandle | None = None
        self._cut = False
        self.logger = _Quiet(self.logger, self.cuts, self.loop)
        super().connection_made(transport)  # type: ignore[misc]
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self._cut:  # cut by the gate; the abort is on its way
            return
        super().data_received(data)  # type: ignore[misc]
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._watch()  # waiting again (or already serving a pipelined request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        """The client reads slower than the answer comes: it has ``WRITE_STALL_SECONDS`` to take enough of it
        (the buffer back under its low-water mark); meanwhile the connection is not waiting for a head."""
        super().pause_writing()  # type: ignore[misc]
        self._release()
        if self._write_stall is None:
            self._write_stall = self.loop.call_later(WRITE_STALL_SECONDS, self._stalled)

    def _stalled(self) -> None:
        self._write_stall = None
        self.cuts.write_stall += 1
        self.cuts.noted(self.loop)
        self.transport.abort()

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().resume_writing()  # type: ignore[misc]
        self._watch()  # the response is nearly out: waiting for the next head, if nothing else runs

    def _waiting(self) -> bool:
        """No request is being served or queued (httptools queues pipelined ones in ``pipeline``), and the last
        response is (nearly) out: one the client is still reading (writing paused) is its to finish, under
        ``WRITE_STALL_SECONDS``, not the head deadline (a slow link's 8 MiB answer was cut 5 s in)."""
        cycle = self.cycle
        flow = getattr(self, "flow", None)
        return ((cycle is None or cycle.response_complete) and not getattr(self, "pipeline", None)
                and not (flow is not None and flow.write_paused))

    def _watch(self) -> None:
        if self._cut:
            return
        if self.transport.is_closing() or not self._waiting():
            self._release()
        elif self._ticket is None:
            client = self.client
            self._ticket = self.gate.admit(None, client[0] if client else "", cut=self._on_cut)
            self._timer = self.loop.call_later(self.gate.deadline, self._expire)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticket is not None:
            self.gate.done(self._ticket)
            self._ticket = None

    def _expire(self) -> None:
        ticket, self._timer = self._ticket, None
        if ticket is not None and ticket.pending:  # the loop's clock may run a hair ahead of the gate's
            self.gate.reap(max(time.monotonic(), ticket.deadline))

    def _on_cut(self) -> None:
        """The gate cut this connection (deadline, or room for a newer one); under the gate's lock."""
        self._cut = True
        self._ticket = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.call_soon(self.transport.abort)  # abort: a client not reading its last response holds nothing
        self.cuts.noted(self.loop)


def gated_protocol(cuts: Cuts, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """``base`` (a uvicorn HTTP protocol class; default ``HTTP_PROTOCOL``) whose connections wait for their
    request heads under ``cuts.gate``, counting what they cut in ``cuts``."""
    base = base or HTTP_PROTOCOL
    return type(f"Gated{base.__name__}", (_Gated, base), {"gate": cuts.gate, "cuts": cuts})


def _counting_408s(app: Any, cuts: Cuts) -> Any:
    """``app`` (ASGI), each 408 it answers counted as a ``body_deadline`` cut."""
    async def counted(scope: Any, receive: Any, send: Any) -> None:
        async def watched(message: Any) -> None:
            if message.get("type") == "http.response.start" and message.get("status") == 408:
                cuts.body_deadline += 1
                cuts.noted(asyncio.get_running_loop())
            await send(message)

        await app(scope, receive, send if scope.get("type") != "http" else watched)
    return counted


def _per_source(app: Any, cap: int, cuts: Cuts) -> Any:
    """``app`` (ASGI) serving at most ``cap`` requests at once from one source address: each past it is a 503 at
    once, its connection closed and counted as a ``source_limit`` cut (its body is never read)."""
    serving: dict[str, int] = {}

    async def bounded(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        client = scope.get("client")
        source = client[0] if client else ""
        if serving.get(source, 0) >= cap:
            cuts.source_limit += 1
            cuts.noted(asyncio.get_running_loop())
            body = f"more than {cap} requests at once from one address\n".encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        serving[source] = serving.get(source, 0) + 1
        try:
            await app(scope, receive, send)
        finally:
            left = serving[source] - 1
            if left:
                serving[source] = left
            else:
                del serving[source]
    return bounded


class GatedServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose protocol class waits under ``gate``; ``cuts`` counts what it cut."""

    def __init__(self, config: uvicorn.Config, cuts: Cuts) -> None:
        super().__init__(config)
        self.gate, self.cuts = cuts.gate, cuts


def server(app: Any, host: str, port: int, *, name: str, metrics: Metrics | None = None,
           head_seconds: float = HEAD_SECONDS, max_waiting: int = MAX_WAITING, per_source: int | None = None,
           **options: Any) -> GatedServer:
    """A server for ``app`` on ``host:port`` with a fresh gate (``options``: more ``uvicorn.Config`` keywords);
    ``run()`` it, or ``serve(sockets=[...])`` on sockets already bound. Its cuts are counted as server ``name``
    (and exported to ``metrics`` when given). ``per_source``: requests served at once from one source address,
    at most (``_per_source``; None: no such bound)."""
    cuts = Cuts(name, HandshakeGate(max_waiting, max(1, max_waiting // 2), head_seconds))
    if metrics is not None:
        cuts.export(metrics)
    asgi = _counting_408s(app, cuts)
    if per_source is not None:
        asgi = _per_source(asgi, per_source, cuts)
    return GatedServer(uvicorn.Config(asgi, host=host, port=port, http=gated_protocol(cuts),
                                      ws="none", **options), cuts)
