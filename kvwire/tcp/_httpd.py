"""A small threaded HTTP server whose connections pass a ``HandshakeGate``, listening as ``listen`` does.

Owns: ``GatedHTTPServer``: one thread per connection, admitted through a ``HandshakeGate`` (at most
``gate.max_pending`` connections not yet past their gate, each cut at the gate's deadline, a new one always
gets in), every socket read bounded by ``timeout``, IPv4, IPv6 or dual-stack on ``"::"``. A handler that
authenticates its request calls ``server.passed(self.request)`` to free its slot early (the connection then
no longer counts against unauthenticated ones); otherwise the slot is freed when the connection ends.
Must not know: what is served, or how a request authenticates. Used by ``kvwire.metrics`` and the SGLang
backend's bootstrap mailbox.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._gate import HandshakeGate, Ticket
from ._wire import listen


class GatedHTTPServer(ThreadingHTTPServer):
    """``handler`` on ``(host, port)``, each connection through ``gate``; call ``serve_forever`` to serve."""

    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], gate: HandshakeGate,
                 timeout: float, name: str = "kvwire-http") -> None:
        sock = listen(host, port)
        self.address_family = sock.family
        super().__init__(sock.getsockname(), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.gate, self.timeout_s, self.thread_name = gate, timeout, name
        self._tickets: dict[socket.socket, Ticket] = {}
        self._tickets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        ticket = self.gate.admit(request, str(client_address[0]))
        with self._tickets_lock:
            self._tickets[request] = ticket
        request.settimeout(self.timeout_s)
        threading.Thread(target=self._serve_one, args=(request, client_address),
                         name=self.thread_name, daemon=True).start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a client's failure ends its connection only
            pass
        finally:
            self.passed(request)
            self.shutdown_request(request)

    def passed(self, request: Any) -> None:
        """``request``'s connection is past its gate (authenticated, or over): its slot is free."""
        with self._tickets_lock:
            ticket = self._tickets.pop(request, None)
        if ticket is not None:
            self.gate.done(ticket)

    def service_actions(self) -> None:  # each turn of serve_forever's loop (0.5 s)
        self.gate.reap()

    def server_close(self) -> None:
        super().server_close()
        self.gate.close()


__all__ = ["GatedHTTPServer"]
