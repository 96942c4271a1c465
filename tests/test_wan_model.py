"""The WAN emulator's pure parts: link model, NFQUEUE message codec, unit parsing (no root needed)."""

from __future__ import annotations

import random
import struct

import pytest

from kvwire.testing import nfqueue as nfq
from kvwire.testing.linkmodel import DirectionSpec, LinkDirection, requeued
from kvwire.testing.wan import parse_bytes, parse_loss, parse_ms, parse_rate_mbit


def test_serialisation_then_delay() -> None:
    d = LinkDirection(DirectionSpec(rate_bps=8e6, delay=0.010, queue_bytes=1 << 20))  # 1 byte per µs
    assert d.arrive(0.0, 1000) == pytest.approx(0.001 + 0.010)
    assert d.arrive(0.0, 1000) == pytest.approx(0.002 + 0.010)  # waits behind the first
    assert d.backlog_bytes(0.0) == pytest.approx(2000)
    assert d.arrive(0.5, 500) == pytest.approx(0.5005 + 0.010)  # idle link: no waiting
    assert d.stats.packets_out == 3 and d.stats.bytes_out == 2500


def test_drop_tail_counts_bytes() -> None:
    d = LinkDirection(DirectionSpec(rate_bps=8e6, delay=0.0, queue_bytes=3000))
    releases = [d.arrive(0.0, 1000) for _ in range(5)]
    assert releases[:3] == pytest.approx([0.001, 0.002, 0.003]) and releases[3:] == [None, None]
    assert d.stats.queue_drops == 2 and d.stats.max_backlog_bytes == 3000
    assert d.arrive(0.0015, 1000) == pytest.approx(0.004)  # 1.5 packets drained: room again


def test_random_loss_rate() -> None:
    d = LinkDirection(DirectionSpec(rate_bps=1e12, delay=0.0, loss=0.1), random.Random(7))
    n = 20_000
    dropped = sum(d.arrive(i * 1e-3, 100) is None for i in range(n))
    assert dropped == d.stats.random_drops
    assert abs(dropped / n - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5


def test_loss_per_wire_packet_drops_a_super_packet_with_the_chance_of_any_of_its_packets() -> None:
    """``loss_mtu``: a 64 KB GSO super-packet stands for 45 wire packets of 1500 bytes (1448 of payload after
    52 of headers each) and is lost with 1 - (1 - p)^45; a packet of at most the MTU keeps p. The control:
    without ``loss_mtu`` the same super-packets are lost with p."""
    size, p, n = 52 + 45 * 1448, 0.01, 20_000
    spec = DirectionSpec(rate_bps=1e12, delay=0.0, loss=p, loss_mtu=1500)
    assert spec.loss_chance(1500) == p and spec.loss_chance(100) == p
    assert spec.loss_chance(1501) == pytest.approx(1 - (1 - p) ** 2)
    want = 1 - (1 - p) ** 45
    assert spec.loss_chance(size) == pytest.approx(want) and spec.loss_chance(size + 1) == pytest.approx(
        1 - (1 - p) ** 46)
    for loss_mtu, expect in ((1500, want), (0, p)):
        d = LinkDirection(DirectionSpec(rate_bps=1e12, delay=0.0, loss=p, loss_mtu=loss_mtu), random.Random(3))
        dropped = sum(d.arrive(i * 1e-3, size) is None for i in range(n))
        assert abs(dropped / n - expect) < 4 * (expect * (1 - expect) / n) ** 0.5, (loss_mtu, dropped / n)
    with pytest.raises(ValueError, match="loss_mtu"):
        DirectionSpec(rate_bps=1e6, delay=0.0, loss_mtu=40).check()


def test_rate_change_applies_to_new_packets() -> None:
    d = LinkDirection(DirectionSpec(rate_bps=8e6, delay=0.0))
    assert d.arrive(0.0, 1000) == pytest.approx(0.001)
    assert d.update(0.5, rate_bps=4e6) == 2.0  # (nothing queued at 0.5: nothing to move)
    assert d.arrive(1.0, 1000) == pytest.approx(1.002)
    with pytest.raises(ValueError):
        d.update(1.0, loss=1.5)
    assert d.spec.loss == 0.0


def test_a_rate_change_drains_the_queue_at_the_new_rate() -> None:
    """A router's queue leaves at the link's current rate: a queue filled at 2 % of the rate is gone within
    the new rate's time for its bytes once the rate comes back (the model used to keep the old release times,
    so for a second every packet read a backlog of 50 buffers and was dropped). Packets already serialised
    keep their times; the rest are moved by ``requeued``, in order."""
    d = LinkDirection(DirectionSpec(rate_bps=8e4, delay=0.010, queue_bytes=10_000))  # 10 bytes per ms
    held = [d.arrive(0.0, 1000) for _ in range(10)]  # 100 ms each: serialised at 0.1, 0.2 .. 1.0
    assert held[-1] == pytest.approx(1.0 + 0.010) and d.arrive(0.0, 1000) is None  # full
    now = 0.25  # the first two are on the wire, the third is half serialised
    scale = d.update(now, rate_bps=8e6)  # 100x the rate
    assert scale == pytest.approx(0.01)
    moved = [requeued(r, now, 0.010, scale) for r in held if r is not None]
    assert moved[:2] == held[:2]
    assert moved[2] == pytest.approx(now + 0.05 * 0.01 + 0.010)
    assert moved[-1] == pytest.approx(now + 0.75 * 0.01 + 0.010)
    assert moved == sorted(moved)
    assert d.backlog_bytes(now) == pytest.approx(7500)  # the bytes still queued, read at the new rate
    assert d.arrive(now, 1000) == pytest.approx(now + 0.0075 + 0.001 + 0.010)  # room, right behind them
    # the negative control: at the old release times the queue would read 7500 bytes x 100 and drop
    stale = LinkDirection(DirectionSpec(rate_bps=8e6, delay=0.010, queue_bytes=10_000))
    stale._free_at = 1.0  # (what the old update left: the serialiser busy until 1.0 s)
    assert stale.arrive(now, 1000) is None


def test_nfqueue_packet_parse_and_verdict_encoding() -> None:
    attrs = (nfq._attr(nfq.A_PACKET_HDR, struct.pack("!IHB", 4242, 0x0800, 2))
             + nfq._attr(5, struct.pack("!I", 3)) + nfq._attr(nfq.A_CAP_LEN, struct.pack("!I", 1500))
             + nfq._attr(nfq.A_PAYLOAD, b"E" * 40))
    one = nfq._msg(nfq.MSG_PACKET, 0, 0, 1, attrs)
    small = nfq._msg(nfq.MSG_PACKET, 0, 0, 0, nfq._attr(nfq.A_PACKET_HDR, struct.pack("!IHB", 7, 0x0800, 2))
                     + nfq._attr(nfq.A_PAYLOAD, b"E" * 28))  # fully copied: no CAP_LEN
    other = nfq._msg(nfq.MSG_CONFIG, 0, 0, 0, b"")
    buf = one + other + small
    assert nfq.parse_packets(buf, len(buf)) == [(1, 4242, 1500), (0, 7, 28)]
    assert nfq.parse_packets(buf, len(one) - 1) == []  # a truncated message is not trusted
    v = nfq.verdict_batch(1, 99)
    mlen, mtype = struct.unpack_from("=IH", v)
    assert mlen == len(v) and mtype == nfq.MSG_VERDICT_BATCH
    assert struct.unpack_from("!H", v, 18)[0] == 1  # queue number, big-endian
    assert struct.unpack_from("!II", v, 24) == (nfq.NF_ACCEPT, 99)
    assert struct.unpack_from("!II", nfq.verdict(0, 5, False), 24) == (nfq.NF_DROP, 5)


def test_unit_parsing() -> None:
    assert parse_rate_mbit("400mbit") == 400 and parse_rate_mbit("1gbit") == 1000
    assert parse_rate_mbit("500kbit") == 0.5 and parse_rate_mbit("250") == 250
    assert parse_ms("20ms") == 20 and parse_ms("0.5s") == 500 and parse_ms("15") == 15
    assert parse_loss("0.1%") == pytest.approx(0.001) and parse_loss("0.02") == 0.02
    assert parse_bytes("1MB") == 1_000_000 and parse_bytes("512KiB") == 512 * 1024
    assert parse_bytes("1500") == 1500
    with pytest.raises(ValueError):
        parse_rate_mbit("fast")


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvwire.testing import netns, wan

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert wan.unavailable_reason() == "needs root (network namespaces)"
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda t: None if t == "iptables" else "/usr/sbin/" + t)
    assert wan.unavailable_reason() == "missing tools: iptables"
