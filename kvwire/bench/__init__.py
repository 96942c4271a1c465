"""``kvwire-bench``: an iperf3-style benchmark of kvwire with KV-cache-shaped, verified transfers.

Owns: the command line (``cli``, ``options``) and, kept apart, the two roles and the two directions of a
test. Roles: the client dials the control connection (``control.client_connect``), the server listens
(``server``: the port, the handshake gate, one test at a time). Directions: the sending side (``sending``, with
``requester``, ``sampler``, ``adaptive`` for ``--adaptive``/``--polite``/``--probe``)
and the receiving side (``receiving``: a kvwire Receiver, the ``pool``, the pattern check). A plain test
is the client sending to the server; ``-R`` (``reverse``) swaps the directions on the same connection.
Beside them: the side channel's messages over kvwire's own framing and authentication (``control``),
payload patterns (``payload``), the run document and its text/JSON/plot renderings (``document``,
``report``, ``plot``), ``--loopback``/``--emulate`` (``loopback``, ``emulate``) and ``--decode-tp``
(``reshard``). Must not know: kvwire's internals beyond its public session/receiver, congestion, probe and
socket-option API and ``Session.lane_info()``; nothing here is imported by the library itself.
"""

from .cli import main

__all__ = ["main"]
