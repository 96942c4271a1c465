"""TCP_INFO reader and congestion knobs, on real loopback sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvwire.congestion.tcpinfo import (
    LaneCounters,
    TcpInfo,
    TcpInfoUnavailable,
    parse_tcp_info,
    read_pacing_rate,
    read_tcp_info,
    sample,
    try_read,
)
from kvwire.sockopts import (
    UNSENT_MIN,
    UNSENT_SECONDS,
    UnknownCongestionAlgorithm,
    available_congestion_algorithms,
    get_congestion,
    get_pacing_rate,
    get_unsent_limit,
    set_congestion,
    set_pacing_rate,
    set_unsent_limit,
    unsent_limit,
)


def _drain(sock: socket.socket, n: int) -> None:
    buf = bytearray(1 << 16)
    while n:
        got = sock.recv_into(buf, min(n, len(buf)))
        assert got
        n -= got


def _slow_reader_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, accepted) on loopback, the accepted end with a 64 kB receive buffer: while it reads
    nothing, what the client writes past the window stays unsent in its socket."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    return srv, cli, acc


def test_bytes_acked_grows_after_sending(pair: tuple[socket.socket, socket.socket]) -> None:
    cli, acc = pair
    before = read_tcp_info(cli)
    assert before.state == 1  # TCP_ESTABLISHED
    payload = b"x" * (4 << 20)
    reader = threading.Thread(target=_drain, args=(acc, len(payload)))
    reader.start()
    cli.sendall(payload)
    reader.join(10)
    assert not reader.is_alive()
    after = read_tcp_info(cli)
    assert before.bytes_acked is not None and after.bytes_acked is not None
    # everything sent was acked by the time the reader has it all (give or take the last ACK in flight)
    assert after.bytes_acked - before.bytes_acked >= len(payload) - (256 << 10)
    assert after.bytes_sent is not None and after.bytes_sent >= len(payload)
    assert after.min_rtt_us is not None and 0 < after.min_rtt_us < 1_000_000
    assert after.snd_mss and after.snd_cwnd and after.cwnd_bytes == after.snd_mss * after.snd_cwnd
    # tcpi_delivered (segments) x MSS agrees with bytes_acked to within one segment per send
    assert before.delivered is not None and after.delivered is not None
    delivered = (after.delivered - before.delivered) * after.snd_mss
    acked = after.bytes_acked - before.bytes_acked
    assert acked <= delivered <= acked + 64 * after.snd_mss
    # the receiving side counts what it got
    got = read_tcp_info(acc)
    assert got.bytes_received is not None and got.bytes_received >= len(payload)


def test_truncated_buffer_parses_only_what_fits(pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    raw = cli.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    full = parse_tcp_info(raw)
    assert full.length == len(raw) >= 232
    short = parse_tcp_info(raw[:104])  # up to and including total_retrans (offset 100, u32)
    assert short.length == 104
    assert short.rtt_us == full.rtt_us and short.snd_mss == full.snd_mss
    assert short.total_retrans == full.total_retrans
    assert short.pacing_rate is None and short.bytes_acked is None and short.snd_wnd is None
    # a field that straddles the end is not read
    partial = parse_tcp_info(raw[:124])
    assert partial.max_pacing_rate == full.max_pacing_rate and partial.bytes_acked is None
    empty = parse_tcp_info(b"")
    assert empty == TcpInfo(length=0)


def test_closed_socket_raises_typed_error() -> None:
    s = socket.socket()
    s.close()
    with pytest.raises(TcpInfoUnavailable):
        read_tcp_info(s)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(TcpInfoUnavailable):
            read_tcp_info(udp)
    finally:
        udp.close()


def test_pacing_rate_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    assert get_pacing_rate(cli) is None
    set_pacing_rate(cli, 12_500_000)
    assert get_pacing_rate(cli) == 12_500_000
    assert read_tcp_info(cli).max_pacing_rate == 12_500_000
    set_pacing_rate(cli, None)
    assert get_pacing_rate(cli) is None
    with pytest.raises(ValueError):
        set_pacing_rate(cli, 0)


def test_an_unsent_bound_makes_a_write_wait_for_the_socket_to_drain() -> None:
    """With ``TCP_NOTSENT_LOWAT`` (``set_unsent_limit``) the socket's unsent backlog is bounded: a blocking
    write returns only once the socket is nearly drained, so a writer striping chunks over several lanes
    does not park chunks behind seconds of earlier data on one of them. The peer reads nothing (a small
    receive buffer): what the sender's kernel accepts in 0.5 s is the window plus the unsent backlog;
    unbounded, the send buffer takes megabytes."""
    assert unsent_limit(None) == 0 and unsent_limit(1000) == UNSENT_MIN
    assert unsent_limit(100_000_000) == int(100_000_000 * UNSENT_SECONDS)
    assert unsent_limit(10**12) == 0  # loopback rates: beyond any send buffer, no bound

    def accepted(bound: int) -> int:
        srv, cli, acc = _slow_reader_pair()
        try:
            set_unsent_limit(cli, bound)
            assert get_unsent_limit(cli) == bound
            cli.settimeout(0.5)
            n, block = 0, b"x" * 65536
            try:
                while n < 64 << 20:
                    n += cli.send(block)
            except TimeoutError:
                pass
            return n
        finally:
            for s in (cli, acc, srv):
                s.close()

    bounded, unbounded = accepted(unsent_limit(1_000_000)), accepted(0)
    assert bounded < 1 << 20 and unbounded > 2 * bounded, (bounded, unbounded)


def test_a_lane_bounds_its_unsent_backlog_by_its_sending_rate(pair: tuple[socket.socket, socket.socket]) -> None:
    """``Lane.bound_unsent`` (before each chunk): UNSENT_SECONDS of the kernel's pacing rate, which a cap
    bounds; on loopback, uncapped, the kernel's rate is tens of GB/s and no bound is set (a loaded host can read
    it lower: then the bound its rate gives)."""
    from kvwire.codec.frames import DEFAULT_LIMITS
    from kvwire.tcp._lanes import Lane
    from kvwire.tcp._wire import Channel

    cli, acc = pair
    lane = Lane(0, Channel(cli, DEFAULT_LIMITS))
    lane.bound_unsent()
    assert get_unsent_limit(cli) == 0
    set_pacing_rate(cli, 10_000_000)
    assert read_pacing_rate(cli) == 10_000_000
    lane.bound_unsent()
    assert get_unsent_limit(cli) == unsent_limit(10_000_000) == 300_000
    set_pacing_rate(cli, 10_500_000)  # within a quarter: left as it is
    lane.bound_unsent()
    assert get_unsent_limit(cli) == 300_000
    set_pacing_rate(cli, None)  # the kernel's rate follows with the next acknowledgements
    reader = threading.Thread(target=_drain, args=(acc, 1 << 20))
    reader.start()
    cli.sendall(b"z" * (1 << 20))
    reader.join(10)
    lane.bound_unsent()
    # the capped bound is gone and the lane follows the kernel's own rate again: on loopback tens of GB/s, so
    # no bound at all; under a loaded full suite the rate read 6.8 GB/s once and a 205 MB bound stood instead
    rate = read_pacing_rate(cli)
    assert rate is not None and rate > 100 * 10_500_000
    assert get_unsent_limit(cli) == unsent_limit(rate) != 300_000


def test_a_lane_whose_rate_fell_below_what_it_holds_is_backlogged_until_that_drains() -> None:
    """``Lane.backlogged`` (before a lane takes a chunk): more unsent than twice the bound of the rate its kernel
    paces it at now, plus a write's overshoot. A lane that filled its bound at 10 MB/s is not; once its cap (or its
    algorithm's estimate) falls to 100 kB/s, what it holds takes seconds to leave and it is, until that drains.
    ``drain`` bounds it at the new rate. The peer reads nothing at first (a small receive buffer), so the bytes
    stay unsent."""
    from kvwire.codec.frames import DEFAULT_LIMITS
    from kvwire.congestion.tcpinfo import read_pacing_unsent
    from kvwire.tcp._lanes import Lane
    from kvwire.tcp._wire import Channel

    srv, cli, acc = _slow_reader_pair()
    reader: threading.Thread | None = None
    try:
        lane = Lane(0, Channel(cli, DEFAULT_LIMITS))
        assert not lane.backlogged()  # uncapped on loopback: no bound at all
        set_pacing_rate(cli, 10_000_000)
        lane.bound_unsent()  # 300 kB: what a lane at 10 MB/s holds at most
        assert get_unsent_limit(cli) == 300_000
        cli.setblocking(False)
        try:
            while True:
                cli.send(b"x" * 65536)
        except BlockingIOError:
            pass
        cli.setblocking(True)
        rate, unsent = read_pacing_unsent(cli)
        assert rate == 10_000_000 and 300_000 <= unsent < 2 * 300_000, unsent
        assert not lane.backlogged()  # the negative control: what it holds leaves within its bound's time
        set_pacing_rate(cli, 100_000)  # its rate falls: 64 kB (UNSENT_MIN) is its bound now
        assert read_pacing_unsent(cli) == (100_000, unsent)
        assert lane.backlogged()
        lane.drain(0.01)
        assert get_unsent_limit(cli) == UNSENT_MIN
        reader = threading.Thread(target=lambda: all(iter(lambda: acc.recv(65536), b"")))  # (until EOF)
        set_pacing_rate(cli, 10_000_000)  # back up (and the peer reads): it drains, and is not any more
        reader.start()
        deadline = time.monotonic() + 10
        while lane.backlogged() and time.monotonic() < deadline:
            lane.drain(0.05)
        assert not lane.backlogged()
    finally:
        cli.close()
        if reader is not None:
            reader.join(10)
        acc.close()
        srv.close()


def test_pacing_rate_caps_throughput(pair: tuple[socket.socket, socket.socket]) -> None:
    import time

    cli, acc = pair
    rate = 20_000_000  # 20 MB/s; loopback does GB/s uncapped
    set_pacing_rate(cli, rate)
    n = 8 << 20
    reader = threading.Thread(target=_drain, args=(acc, n))
    reader.start()
    t0 = time.monotonic()
    cli.sendall(b"y" * n)
    reader.join(30)
    elapsed = time.monotonic() - t0
    # pacing can only slow a sender: it must take at least ~n/rate (first burst allowed)
    assert elapsed >= 0.8 * n / rate


def test_congestion_algorithm_switch(pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    algos = available_congestion_algorithms()
    assert "reno" in algos  # always built in
    for name in algos:
        set_congestion(cli, name)
        assert get_congestion(cli) == name
    with pytest.raises(UnknownCongestionAlgorithm):
        set_congestion(cli, "no-such-cc")


def _connected(srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    cli = socket.create_connection(srv.getsockname())
    return cli, srv.accept()[0]


def test_a_lanes_received_bytes_do_not_count_its_senders_fin() -> None:
    """The kernel's ``bytes_received`` counts the FIN's sequence number once the peer closed: a bench lane
    read after its sender closed it showed 1 byte more than the sender sent (26729 of 26728). The payload
    only. Negative control: the kernel's own reading is one more."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        cli, acc = _connected(srv)
        try:
            counters = LaneCounters(("bytes_received",))
            cli.sendall(b"z" * 1000)
            _drain(acc, 1000)
            assert counters.read(0, acc) is not None and counters.total(0, "bytes_received") == 1000
            cli.close()
            assert acc.recv(1) == b""  # the FIN is in
            info = counters.read(0, acc)
            assert info is not None and info.state == 8 and info.bytes_received == 1001  # CLOSE_WAIT
            assert counters.total(0, "bytes_received") == 1000
        finally:
            acc.close()


def test_lane_counters_sum_a_lanes_sockets_across_a_reconnect() -> None:
    """A lane's total is what each of its sockets sent, the closed one's last reading included; the socket
    that replaced it counts from zero (the kernel's counters are per socket)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        first, acc1 = _connected(srv)
        second, acc2 = _connected(srv)
        counters = LaneCounters(("bytes_sent", "bytes_received"))
        try:
            for sock, acc, n in ((first, acc1, 100_000), (second, acc2, 50_000)):
                reader = threading.Thread(target=_drain, args=(acc, n))
                reader.start()
                sock.sendall(b"z" * n)
                reader.join(10)
                assert counters.read(0, sock) is not None and counters.read(1, acc) is not None
                if sock is first:
                    first.close()  # the lane reconnects: its old socket's reading stands
                    assert counters.read(0, first) is None and counters.total(0, "bytes_sent") == 100_000
            assert counters.total(0, "bytes_sent") == 150_000 and counters.total(1, "bytes_received") == 150_000
            assert counters.sockets(0) == [first, second] and counters.lanes() == [0, 1]
            assert counters.total(7, "bytes_sent") == 0
            with pytest.raises(ValueError):
                LaneCounters(("no_such_field",))
        finally:
            for s in (second, acc1, acc2):
                s.close()


def test_sample_keys_open_tcp_sockets_by_descriptor(pair: tuple[socket.socket, socket.socket]) -> None:
    cli, acc = pair
    closed = socket.socket()
    closed.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        got = sample([cli, closed, udp, acc])
        assert sorted(got) == sorted([cli.fileno(), acc.fileno()]) and got[cli.fileno()].state == 1
        assert try_read(closed) is None and try_read(cli) is not None
    finally:
        udp.close()


def test_knob_functions_moved_to_sockopts_still_resolve_with_a_warning() -> None:
    import kvwire.congestion.tcpinfo as tcpinfo
    from kvwire import sockopts

    with pytest.warns(DeprecationWarning, match="kvwire.sockopts.set_pacing_rate"):
        assert tcpinfo.set_pacing_rate is sockopts.set_pacing_rate
    with pytest.raises(AttributeError):
        tcpinfo.no_such_name  # noqa: B018
