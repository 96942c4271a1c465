"""How the aggregate pacing cap is split over the lanes, request tails included.

Owns: ``idle_lanes`` (which lanes of a ``LinkState`` had nothing queued or in flight for a whole sample)
and ``lane_rates`` (each lane's cap: an even share, or, while some lanes are done and others still send,
the idle lanes' shares moved to the lanes still sending). Pure. Must not know: sockets, sessions, the
policy that sets the aggregate (``controller``).

Why: a request's last chunks sit on a few lanes. Split evenly, each of them keeps its 1/n of the
aggregate while the lanes that finished leave theirs unused: with 32 CUBIC lanes on 400 Mbit/s (12 Mbit/s
each) the last 2 MiB chunk on a lane takes 1.4 s, and a 442 MB request spent 2.5 s of its 13 s at under
half the link. Without word from the lanes, the aggregate never grows: the idle lanes keep ``reserve`` of
an even share, for work that arrives before the next sample, and the others share the rest. Where each
lane says when it picks up work (``woken``: ``LaneController.lane_busy``, before its first byte), the idle
lanes keep an even share instead and the lanes still sending share the whole aggregate: an idle lane sends
nothing, and the one that wakes is re-split before it does. A cap lowered takes effect at once, but one
raised only as the lane's ACKs come back (the kernel keeps a socket's pacing rate under
``SO_MAX_PACING_RATE`` and its algorithm raises it again per ACK): an idle lane held at the reserve spent
the first round trip of the next request at a quarter of its share whatever came after, so it is not
lowered at all where it can be woken.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .estimator import LaneKey, LinkState


def idle_lanes(link: LinkState) -> frozenset[LaneKey]:
    """Lanes with nothing in flight for the whole last interval and nothing unsent in their socket: a
    lane whose part of the request is done (a lane between two chunks still has data in flight)."""
    return frozenset(ln.lane for ln in link.lanes if ln.busy <= 0.0 and ln.notsent_bytes == 0)


def lane_rates(total: int, lanes: Sequence[LaneKey], idle: Collection[LaneKey],
               reserve: float = 0.25, woken: bool = False) -> dict[LaneKey, int]:
    """Each lane's pacing cap (bytes/s) for an aggregate ``total``: ``total // n`` each, unless some but
    not all ``lanes`` are ``idle``: those get ``reserve`` of that even share and the lanes still sending
    split the rest, so the caps never sum to more than ``total``; or, ``woken`` (each lane says when it
    picks up work, before it sends), the idle lanes keep the even share and the lanes still sending split
    all of ``total``: the caps of the lanes that send never sum to more than it."""
    if not lanes:
        return {}
    even = max(1, total // len(lanes))
    sending = [k for k in lanes if k not in idle]
    if not sending or len(sending) == len(lanes):
        return {k: even for k in lanes}
    if woken:
        share = max(1, total // len(sending))
        return {k: share if k not in idle else even for k in lanes}
    low = max(1, int(reserve * even))
    high = max(1, (total - low * (len(lanes) - len(sending))) // len(sending))
    return {k: high if k not in idle else low for k in lanes}
