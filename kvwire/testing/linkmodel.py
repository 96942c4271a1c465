"""One direction of an emulated WAN link, as a pure model: drop-tail queue, bottleneck, loss, delay.

Owns: the per-packet decision ``arrive(now, size) -> release time | None`` — Bernoulli loss (per wire packet
with ``loss_mtu``), a drop-tail
queue counted in bytes in front of a serialiser at the bottleneck rate, then a fixed one-way delay —
and the counters that prove what it did. Release times are non-decreasing while the delay is fixed,
so packets leave in arrival order. Must not know: packets' contents, netlink, clocks, processes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

#: IPv4 + TCP with timestamps: what each wire packet of a GSO super-packet repeats
WIRE_HEADERS = 52


@dataclass
class DirectionSpec:
    """``rate_bps`` in bits/s at the IP layer, ``delay`` one-way in seconds, ``loss`` a probability.
    ``loss_mtu`` (0: off): ``loss`` is per wire packet of at most that many bytes, and a larger packet (a GSO
    super-packet, when the emulator takes them whole) is dropped with the chance that any of the wire packets it
    stands for would be (``loss_chance``): loss events per byte as on the per-packet link."""

    rate_bps: float
    delay: float
    loss: float = 0.0
    queue_bytes: int = 1 << 20
    loss_mtu: int = 0

    def check(self) -> None:
        if self.rate_bps <= 0:
            raise ValueError("rate must be positive")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.queue_bytes <= 0:
            raise ValueError("queue_bytes must be positive")
        if not (self.loss_mtu == 0 or self.loss_mtu > WIRE_HEADERS):
            raise ValueError("loss_mtu must be 0 or above the headers")

    def loss_chance(self, size: int) -> float:
        """The chance that a packet of ``size`` bytes is lost (wanemu_link.h's ``loss_chance``)."""
        if self.loss_mtu <= 0 or size <= self.loss_mtu:
            return self.loss
        per = self.loss_mtu - WIRE_HEADERS
        keep = 1.0
        for _ in range((size - WIRE_HEADERS + per - 1) // per):  # the wire packets it stands for
            keep *= 1.0 - self.loss
        return 1.0 - keep


@dataclass
class DirectionStats:
    packets_in: int = 0
    bytes_in: int = 0
    random_drops: int = 0
    queue_drops: int = 0
    packets_out: int = 0  # accepted (scheduled for release)
    bytes_out: int = 0
    max_backlog_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LinkDirection:
    """``arrive`` each packet in time order; it returns when to release it, or ``None`` to drop it."""

    def __init__(self, spec: DirectionSpec, rng: random.Random | None = None) -> None:
        spec.check()
        self.spec = spec
        self.rng = rng or random.Random()
        self.stats = DirectionStats()
        self._free_at = 0.0  # when the serialiser finishes the last accepted packet

    def backlog_bytes(self, now: float) -> float:
        return max(0.0, self._free_at - now) * self.spec.rate_bps / 8

    def arrive(self, now: float, size: int) -> float | None:
        st = self.stats
        st.packets_in += 1
        st.bytes_in += size
        if self.spec.loss and self.rng.random() < self.spec.loss_chance(size):
            st.random_drops += 1
            return None
        backlog = self.backlog_bytes(now)
        if backlog + size > self.spec.queue_bytes:
            st.queue_drops += 1
            return None
        self._free_at = max(now, self._free_at) + size * 8 / self.spec.rate_bps
        st.packets_out += 1
        st.bytes_out += size
        st.max_backlog_bytes = max(st.max_backlog_bytes, int(backlog + size))
        return self._free_at + self.spec.delay

    def update(self, now: float, *, rate_bps: float | None = None, delay: float | None = None,
               loss: float | None = None, queue_bytes: int | None = None) -> float:
        """Change the link at ``now``. A new rate applies to the queue too, as a router's: what is still
        waiting for the serialiser leaves at the new rate, so the backlog in bytes is kept (before, the old
        release times stood, and a queue filled at 2 % of the rate read as 50 times the buffer once the rate
        came back: every packet was dropped for a second after a fault ended). Returns the factor by which
        the time still ahead of the serialiser was scaled (old rate / new rate; 1.0 when the rate is
        unchanged): the caller moves its held packets with ``requeued``. A new delay applies to packets
        accepted from now on."""
        spec = DirectionSpec(
            self.spec.rate_bps if rate_bps is None else rate_bps, self.spec.delay if delay is None else delay,
            self.spec.loss if loss is None else loss,
            self.spec.queue_bytes if queue_bytes is None else queue_bytes, self.spec.loss_mtu)
        spec.check()
        scale = self.spec.rate_bps / spec.rate_bps
        if self._free_at > now:
            self._free_at = now + (self._free_at - now) * scale
        self.spec = spec
        return scale


def requeued(release: float, now: float, delay: float, scale: float) -> float:
    """A held packet's release time after a rate change at ``now`` (``scale`` from ``LinkDirection.update``;
    ``delay`` the one-way delay it was accepted with): its serialisation still ahead of ``now`` is
    stretched or shrunk; a packet already serialised (on the wire) keeps its time. Order is kept."""
    depart = release - delay
    return release if depart <= now else now + (depart - now) * scale + delay
