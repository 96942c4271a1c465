"""``kvwire-bench``: an iperf3-style benchmark of kvwire with KV-cache-shaped, verified transfers.

Owns: the command line (``cli``), its options (``options``), the bench server (``server``, ``pool``), the
client (``client``, ``ctlclient``, ``sampler``; ``adaptive`` for ``--adaptive``/``--polite``/``--probe``),
the side channel between them (``control``), payload patterns (``payload``), the run document and its
text/JSON/plot renderings (``document``, ``report``, ``plot``) and ``--loopback`` (``loopback``). Must not
know: kvwire's internals beyond its public session/receiver, congestion and probe API and lane counters;
nothing here is imported by the library itself.
"""

from .cli import main

__all__ = ["main"]
