"""``--emulate rtt=..,loss=..,rate=..``: the whole bench over an emulated WAN link (``kvwire.testing.wan``).

Owns: checking that namespaces can be used here (root, ``ip``, ``iptables``) with a clear error otherwise,
building the link from the options, starting the one-off bench server inside the link's server namespace
(the ``--loopback`` server, through ``ip netns exec``), describing the link for the reports, and tearing
everything down whatever happens. The client runs in this process with its thread moved into the client
namespace (sockets and the threads it starts live there). Must not know: the test itself or the formats.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import BenchError, UsageError
from .loopback import LoopbackServer
from .options import Options

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def missing_capabilities() -> list[str]:
    """The capabilities namespaces need that this process lacks (root with a reduced bounding set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            eff = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), None)
    except OSError:
        return []
    if eff is None:
        return []
    return [name for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
            if not eff >> bit & 1]


def link_info(link: Any) -> dict[str, Any]:
    """The link's parameters as the reports show them (``start.emulated_link`` in JSON)."""
    return {"rtt_ms": link.rtt_ms, "loss": link.loss, "rate_mbit": link.rate_mbit,
            "queue_bytes": link.queue_bytes, "mtu": link.mtu, "client_addr": link.client_addr,
            "server_addr": link.server_addr, "client_ns": link.client_ns, "server_ns": link.server_ns,
            "emulator": f"kvwire.testing.wan (NFQUEUE, userspace, {link.backend} emulator)",
            "emulator_backend": link.backend}


@contextmanager
def emulated(o: Options) -> Iterator[tuple[Any, LoopbackServer]]:
    """``with emulated(o) as (link, server):`` the link is up and the server listens on
    ``link.server_addr:server.port`` in the server namespace; both are gone after the block."""
    from ..errors import KvwireError
    from ..testing import netns
    from ..testing.wan import WanLink, unavailable_reason

    assert o.emulate is not None
    reason = unavailable_reason()
    caps = missing_capabilities()
    if reason is None and caps:
        reason = f"runs as root without {' and '.join(caps)}"
    if reason is not None:
        raise UsageError(f"--emulate needs root and network namespaces (iproute2, iptables): {reason}")
    kw = dict(o.emulate)
    link = WanLink(rtt_ms=kw["rtt_ms"], loss=kw.get("loss", 0.0), rate_mbit=kw["rate_mbit"],
                   queue_bytes=int(kw["queue_bytes"]) if "queue_bytes" in kw else None,
                   mtu=int(kw.get("mtu", 1500)))
    try:
        link.start()
    except (KvwireError, OSError) as e:
        link.close()
        raise BenchError(f"cannot set up the emulated link (--emulate needs root and network namespaces): "
                         f"{e}") from None
    try:
        with LoopbackServer(o, bind=link.server_addr, prefix=netns.exec_prefix(link.server_ns)) as server:
            yield link, server
    finally:
        link.close()


__all__ = ["emulated", "link_info"]
