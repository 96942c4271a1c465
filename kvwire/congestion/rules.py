"""The pure rate and lane-count rules the controller's policy, its start and ``kvwire.probe`` share:
BBR's full-pipe rule (``pipe_step``), one loss-based flow's rate bound (``mathis_rate``), the loss-based
lanes that carry a rate (``loss_lanes``), the lanes whose socket windows carry a rate (``window_lanes``,
``start_lanes``, ``lanes_for``) and one lane's window (``lane_window_for``).

Owns: those functions and their constants. Must not know: the policy's modes and state, sockets,
samples or sessions; it reads only ``ControllerConfig``'s bounds.
"""

from __future__ import annotations

import math

from .decision import ControllerConfig

MSS = 1448.0  # payload bytes a TCP segment carries on a 1500-byte MTU path
PIPE_GROWTH, PIPE_ROUNDS = 1.25, 3.0  # BBR's full-pipe rule: < 25 % more bandwidth over 3 round trips


def pipe_step(pipe: tuple[float, float] | None, btl_bw: float, now: float, min_rtt: float | None,
              least: float) -> tuple[tuple[float, float] | None, bool]:
    """BBR's full-pipe rule, one sample at a time: ``pipe`` is (``btl_bw`` when it last grew by
    ``PIPE_GROWTH``, when), None before any. Returns the new ``pipe`` and whether the pipe is full: no such
    growth for ``PIPE_ROUNDS`` round trips (``least`` seconds at least). Pure; shared by the controller's
    PROBE and ``kvwire.probe``'s burst."""
    if btl_bw > 0 and (pipe is None or btl_bw >= PIPE_GROWTH * pipe[0]):
        return (btl_bw, now), False
    return pipe, pipe is not None and now - pipe[1] >= max(least, PIPE_ROUNDS * (min_rtt or 0.0)) - 1e-9


def mathis_rate(rtt: float, loss: float, mss: float = MSS) -> float:
    """One loss-based TCP flow's rate bound (bytes/s): ``MSS / RTT x 1.22 / sqrt(p)``."""
    return mss / rtt * 1.22 / math.sqrt(loss)


#: a loss-based lane's share of the aggregate pacing, as a fraction of its Mathis rate (``loss_lanes``)
LOSS_SHARE = 0.5


def loss_lanes(rate: float, rtt: float, loss: float) -> int:
    """Loss-based (CUBIC, Reno) lanes that carry ``rate`` (bytes/s) over ``rtt`` at random ``loss``, each
    paced at a ``LOSS_SHARE`` of its Mathis rate (``ceil(rate / (LOSS_SHARE x mathis_rate))``).

    Why not one Mathis rate a lane: a paced lane's window stops growing at its cap (``W`` packets); a random
    loss cuts it to 0.7 W (CUBIC's beta) and at these windows CUBIC regrows like Reno, ~0.53 packets a round
    trip, so it sits under its cap for ~0.57 W round trips and loses ~15 % of its share meanwhile. Losses
    come ``p x W`` a round trip, so a lane loses ~0.085 p W^2 of its share, and with ``W`` a ``k``-th of the
    Mathis window (1.22 / sqrt(p)) that is ~0.13 / k^2 whatever the link: 13 % at one Mathis rate a lane
    (measured on 400 Mbit/s, 20 ms, 0.1 % loss: 20 CUBIC lanes carried 89 % of the link), ~3 % at half
    of one (k = 2: 35 lanes there). The pacing cap keeps a lane from taking a backed-off peer's idle share,
    so the lanes' count, not the split, is what makes the aggregate robust to each lane's backoffs.
    ``loss`` is clamped to 1e-6 at least."""
    return math.ceil(rate / (LOSS_SHARE * mathis_rate(rtt, max(loss, 1e-6))))


def window_lanes(rate: float, rtt: float, lane_window: float) -> int:
    """Lanes whose socket windows carry ``rate`` (bytes/s) over ``rtt`` with BBR's headroom: ``ceil(2 x BDP /
    lane_window)`` (BBR keeps up to twice the BDP in flight while it probes; one lane holds ``lane_window``)."""
    return math.ceil(2 * rate * rtt / lane_window)


def start_lanes(rtt: float | None, cfg: ControllerConfig, capacity: float | None = None,
                lane_window: float | None = None) -> int:
    """The lane count a controller starts with, from the path's RTT (the handshake's) and the per-socket
    window ceiling (``lane_window``, default ``cfg.lane_window``; see ``lane_window_for``): enough lanes that
    their windows carry the last ``capacity`` estimate, or ``cfg.start_rate`` when there is none, with the
    headroom the controller keeps (``window_lanes``), so that a long fat path is not held by 4 send buffers
    while the window-bound rule doubles them one decision (~1.3 s) at a time. Pacing, not the lane count,
    keeps the aggregate off the queue once the capacity is measured. Never below ``initial_lanes`` (what
    the caller asked for), never above ``max_lanes``; ``initial_lanes`` on a LAN (``lan_rtt``), without an
    RTT, or with ``start_rate`` None and no capacity. Loss-based lanes (``cfg.algorithm`` CUBIC, Reno) with a
    ``capacity`` measured start at ``max_lanes``: the random loss that sizes them (``loss_lanes``) is not
    known yet, they never shrink on that rule, and spare ones cost nothing under the aggregate pacing; a
    session's warm-up has just opened them all (on 400 Mbit/s, 20 ms, 0.1 % loss, starting on 4 of them
    held the aggregate to a sixth of the link for the 0.4 s until the rule had a loss reading). Pure."""
    rate = capacity if capacity is not None else cfg.start_rate
    if rtt is None or rtt < cfg.lan_rtt or rate is None or rate <= 0:
        return cfg.initial_lanes
    if capacity is not None and cfg.algorithm is not None and cfg.algorithm != "bbr":
        return cfg.max_lanes
    want = window_lanes(rate, rtt, lane_window if lane_window and lane_window > 0 else cfg.lane_window)
    return max(cfg.initial_lanes, min(cfg.max_lanes, want))


def lane_window_for(send_buffer_max: int | None, cfg: ControllerConfig) -> float:
    """Payload one lane can keep in flight, from the send buffer's ceiling in bytes (``tcp_wmem[2]``, or
    a socket's fixed ``SO_SNDBUF``): half of it (the kernel counts its per-packet overhead against the
    buffer; measured ~2.6 MB of a 4 MiB one in flight at 80 ms). ``cfg.lane_window`` when unknown."""
    return send_buffer_max / 2 if send_buffer_max and send_buffer_max > 0 else cfg.lane_window


def lanes_for(bdp_bytes: float, window_cap_bytes: float, cfg: ControllerConfig) -> int:
    """Starting lane count from the note: ``max(4, ceil(BDP / per-socket window cap))``, clamped."""
    want = max(4, math.ceil(bdp_bytes / window_cap_bytes)) if window_cap_bytes > 0 else cfg.max_lanes
    return max(cfg.min_lanes, min(cfg.max_lanes, want))
