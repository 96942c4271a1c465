"""Lane-count, pacing and congestion-algorithm policy, fed ``LinkState`` snapshots.

Owns: ``decide`` — a pure step function ``(ControllerState, LinkState, ControllerConfig) -> ControllerState``
whose state carries the history the policy needs (when the mode last changed, the last sign of
competing traffic) — ``initial_state``, and the mode transitions ``decide`` is made of. Must not know:
sockets (``controller.LaneController`` applies a decision), how samples are taken, sessions or lanes.

Policy (BBR's cycle at the application level, §3.3 of the TCP bulk-transfer note; the kernel's BBR does
the per-lane work and ignores random loss, the application caps the aggregate so no queue stands):

- Start: the lanes a controller opens with are sized from the handshake RTT and the send-buffer ceiling
  (``start_lanes``: the count ``window_lanes`` wants for the last capacity estimate, else ``start_rate``),
  so a long fat path does not start on 4 send buffers that the window-bound rule doubles one decision at
  a time; never below ``initial_lanes``, and not on a LAN.
- LAN: while the min RTT is under ``lan_rtt`` (loopback, a rack) nothing is changed (PROBE, unpaced): a
  few microseconds of path never make socket windows or a queue the limit, and a default-on controller
  must cost nothing there.
- PROBE: lanes unpaced until the estimator knows the capacity (a standing queue showed the link
  full), at least ``probe_min`` has passed and the pipe is full by BBR's own rule: the bottleneck
  bandwidth (``btl_bw``) grew by less than 25 % over the last three round trips (``full_pipe`` at
  least) — the in-band capacity probe. A queue that reads while delivery still doubles each round trip
  is host delay (a busy sender, receiver or emulator), not a full link: ending there paced a long fat
  pipe at a third of its rate. Sooner, once the queue overflows (``_end_probe_on_overflow``). Gives up
  after ``probe_timeout`` (then cruises unpaced).
- CRUISE: the aggregate is paced at ``pace_gain x capacity`` (each lane gets its share), re-paced as
  the estimate moves by more than ``repace`` (relative). A queueing ratio above ``drain_ratio`` after
  ``settle`` -> DRAIN (unless sharing in polite mode: the queue is then the other flow's).
- DRAIN: paced under the capacity by what empties the standing queue (``(ratio - 1) x min_rtt`` of it,
  at most the bottleneck's buffer as its overflows showed it, ``LinkState.max_queue``: a host stall reads
  as 100 ms of "queue" that a 20 ms buffer cannot hold, and drained the lanes at half the link) in about
  ``drain_time``, between ``drain_gain`` and ``drain_gain_max`` of it, until the ratio is below
  ``drained_ratio`` (or ``drain_max`` passed), then CRUISE. Re-paced down while the capacity estimate
  falls (a rate drop is still being measured when the drain starts).
- UPPROBE: every ``upprobe_interval`` in CRUISE (from when the cruise began: lanes added on the way wait only
  ``settle``), pace at ``upprobe_gain x capacity`` for up to
  ``upprobe_time`` (ends early on a queue above ``drain_ratio``, or one that overflows: a drop-tail queue
  shorter than 30 % of the RTT never reads above ``drain_ratio``, 1.25 at most on 80 ms with 20 ms of
  queue, and drops packets instead; and once the estimate caught up with the probe's pacing at no queue:
  the link carried all of it, so it paid, and the next step follows at once): lets the estimator see a
  capacity that grew. The first one after a capacity a burst measured before the first byte (a warm-up:
  ``initial_state`` given ``capacity``) comes after ``settle`` on a clear link, since a short burst may
  read the capacity low (0.70-1.25x of a 2 Gbit/s, 80 ms link on a 2-core host,
  ``benchmarks/warmup_spread.py``; read low, the lanes cruised at 75 % of it for 1.5 s). When a probe
  paid (the estimate grew, or the lanes delivered more than it at no queue: the estimate's goodput average lags
  the probe's ramp; not from a collapsed estimate, which is re-probed instead), the next up-probe follows
  at once with twice the step (``upprobe_gain`` 1.1, 1.2, 1.4, then
  ``upprobe_gain_max``), so a capacity that doubled is found in about two seconds; the first probe
  that does not pay, or fills a queue, starts the steps over. One that paid less than half its step while
  the lanes did not get all its pacing, and made a queue (above ``drained_ratio``) on the way, met another
  limit (the link's rate, or a sender whose bursts queue): it cruises there (a bigger step would overflow the
  queue); with no queue it was the lanes' own ramp, and the ladder climbs on. What the lanes delivered unpaced (the
  probe's ``btl_bw``, kept as ``delivered``) is evidence of the link: cruising pacing-limited on a clear
  link under less than that, the next up-probe goes straight back to it after ``settle`` (once: if it
  fills a queue or does not pay, it is forgotten; so is one older than ``best_window``), so an estimate
  a false queue cut is restored in under a second instead of in 10 % steps every ``upprobe_clear``. So is
  the estimate from before a fall of more than a quarter in one step: a stall of the host (a busy sender,
  receiver or emulator) reads as a queue with little acked, which the estimator must take for a rate drop
  (it follows one within a few samples); one up-probe tells the two apart.
- Never stuck: the estimator never lowers the capacity on intervals we limited ourselves (nothing queued,
  or held to our own pacing cap) and never below half of what the link delivered within a second; should
  the estimate still sit below ``recover_ratio`` of the best one of the last ``best_window`` while the
  lanes deliver all the pacing lets them (``pacing_limited``) without loss, the controller re-probes:
  pacing off and every lane's algorithm restarted (BBR back in STARTUP: a capped BBR would otherwise
  regrow its own bandwidth estimate by 25 % per eight round trips) until the estimator measured the link
  again (``probe_min``); re-probes that did not bring it back wait ``reprobe_hold``, then twice that,
  and so on up to ``reprobe_hold_max`` (a fault still on at a re-probe is re-probed at most that long
  after it ends, whatever its length; a link that really fell costs a short unpaced burst every few
  seconds until ``best_window`` forgets the old best).
- POLITE (``polite=True``): ``polite_congestion`` (CUBIC) on every lane; alone it cruises like the
  above, but while the estimator reports competing traffic (a standing queue with our goodput below
  the capacity, or a queue back within ``polite_hold`` of a drain), and ``polite_hold`` after, the
  aggregate is paced to ``polite_share x capacity`` (and that queue is left alone: it is theirs).
- Lanes, capacity unknown: while the lanes are loss-bound (each near its Mathis rate, no queue), add
  lanes while goodput grows (``_grow_loss_bound``), in PROBE, CRUISE or POLITE (not while sharing).
- Lanes (changed only when settled, outside PROBE/DRAIN): enough for the path — BBR needs
  ``2 x BDP / lane_window`` lanes; a loss-based algorithm needs ``capacity / (Mathis rate / 2)`` lanes at
  the measured loss (``loss_lanes``: a lane paced at half its Mathis rate regains its cap after a random
  loss's backoff soon enough that the aggregate loses ~3 % to the backoffs, not the ~13 % at one Mathis
  rate a lane; only without a queue: congestive loss is no reason for lanes; in polite mode only while
  no other flow is seen: alone on a lossy link polite CUBIC lanes would otherwise sit at 4 x the Mathis
  rate, a fifth of a 400 Mbit/s, 20 ms, 0.1 % loss link; sharing, the aggregate pacing bounds the lanes).
  Grown at once, shrunk only below half the current count. Receiver-window-limited links never grow
  on these rules.
- Lanes held by their socket windows (send buffer, or the peer's receive window), no queue: doubled while
  each doubling raises goodput (``_grow_window_bound``), in PROBE, CRUISE or POLITE.
  Nothing is judged while the lanes are app-limited (``busy < min_busy``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from .decision import ControllerConfig, ControllerState, Decision, Mode
from .estimator import LinkState
from .rules import MSS, loss_lanes, mathis_rate, pipe_step, window_lanes

_BACK_MARGIN = 1.1  # up-probe back to what the lanes delivered unpaced when it is this far above the pacing
_DROP = 0.75  # an estimate that fell below this x the last one in one step: the last one is kept to probe back to


def initial_state(cfg: ControllerConfig, capacity: float | None = None, lanes: int | None = None,
                  why: str = "") -> ControllerState:
    """PROBE with unpaced lanes; or, given a ``capacity`` an active probe measured, cruise paced under it
    from the first byte (no in-band probing queue). ``lanes`` (default ``initial_lanes``, clamped to
    ``min_lanes..max_lanes``): the count to start with (``start_lanes``), ``why`` says where it came from."""
    n = max(cfg.min_lanes, min(cfg.max_lanes, cfg.initial_lanes if lanes is None else lanes))
    why = f"; {why}" if why else ""
    if capacity is None:
        return ControllerState(Decision(n, None, cfg.algorithm, Mode.PROBE, f"initial{why}"))
    total = int(cfg.pace_gain * capacity)
    mode = Mode.POLITE if cfg.polite else Mode.CRUISE
    return ControllerState(Decision(n, max(1, total // n), cfg.algorithm, mode,
                                    f"probed beforehand: paced at {total:.4g} B/s{why}"), unconfirmed=capacity)


def decide(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState:
    """One policy step. Pure: the same inputs give the same output; nothing is touched."""
    now = link.timestamp
    if st.changed_at is None:
        return replace(st, changed_at=now, mode_at=now)
    if link.busy < cfg.min_busy:
        return st
    if link.min_rtt is not None and link.min_rtt < cfg.lan_rtt and st.decision.mode is Mode.PROBE:
        return st  # a LAN (loopback, a rack): the lanes are never the limit there; hands off, unpaced
    d = st.decision
    since = now - st.changed_at
    cap = link.capacity
    q = link.queueing_ratio or 1.0
    if cap is not None and (st.best is None or cap >= st.best or st.best_at is None
                            or now - st.best_at > cfg.best_window):
        st = replace(st, best=cap, best_at=now)
    if st.reprobes and cap is not None and st.best is not None and cap >= cfg.recover_ratio * st.best:
        st = replace(st, reprobes=0)  # recovered: the next collapse is re-probed at once
    if cfg.polite and link.competing_bw and since >= cfg.settle + cfg.judge_after:
        st = replace(st, competing_at=now)  # (a queue right after our own change says nothing of others)

    if st.delivered_at is not None and now - st.delivered_at > cfg.best_window:
        st = replace(st, delivered=None, delivered_at=None)
    if d.pacing_rate is None and link.btl_bw > (st.delivered or 0.0):  # (carried with nothing of ours holding it)
        st = replace(st, delivered=link.btl_bw, delivered_at=now)
    fell = cap is not None and st.last_capacity is not None and cap < _DROP * st.last_capacity
    if fell and st.last_capacity is not None and st.last_capacity > (st.delivered or 0.0):
        st = replace(st, delivered=st.last_capacity, delivered_at=now)  # measured before it fell: try once more
    st = replace(st, last_capacity=cap)
    full = False
    if d.mode is Mode.PROBE:
        pipe = None if st.pipe_bw is None or st.pipe_at is None else (st.pipe_bw, st.pipe_at)
        pipe, full = pipe_step(pipe, link.btl_bw, now, link.min_rtt, cfg.full_pipe)
        if pipe is not None:
            st = replace(st, pipe_bw=pipe[0], pipe_at=pipe[1])

    grown = _grow_loss_bound(st, link, cfg) or _grow_window_bound(st, link, cfg)
    if grown is not None:
        return grown
    if d.mode is Mode.PROBE:
        if cap is not None and since >= cfg.probe_min and full:
            return _pace(replace(st, pipe_bw=None, pipe_at=None), link, cfg, Mode.CRUISE,
                         f"probed capacity {cap:.4g} B/s (delivered up to {link.btl_bw:.4g})", new_mode=True)
        if cap is not None and link.overflowing and cfg.overflow_ends_probe and st.reprobed_at is None:
            return _end_probe_on_overflow(replace(st, pipe_bw=None, pipe_at=None), link, cfg)
        if since >= cfg.probe_timeout:
            return _to(st, link, replace(d, mode=Mode.CRUISE, reason="probe found no capacity: unpaced"))
        return st
    hold = min(cfg.reprobe_hold_max, cfg.reprobe_hold * 2 ** max(0, min(st.reprobes, 16) - 1))
    rested = st.reprobed_at is None or now - st.reprobed_at >= hold
    if (d.mode in (Mode.CRUISE, Mode.POLITE, Mode.DRAIN) and _collapsed(st, link, cfg) and since >= cfg.settle
            and rested):
        assert cap is not None and st.best is not None
        return _reprobe(st, link, f"estimate {cap:.4g} B/s below {cfg.recover_ratio:.0%} of the best "
                        f"{st.best:.4g} while the lanes take all the pacing gives (or so little a lane that its "
                        f"RTT reads delayed ACKs)")
    if d.mode is Mode.DRAIN:
        if q <= cfg.drained_ratio or since >= cfg.drain_max:
            return _pace(replace(st, drained_at=now), link, cfg, Mode.CRUISE, f"drained (ratio {q:.2f})",
                         new_mode=True)
        total = _drain_rate(link, cfg)
        # (only on a measured capacity, and not while we get all the drain's pacing: goodput at our own
        # cap says nothing of the link, and following it down would ratchet the pacing to nothing)
        if (total and d.total_pacing and total < (1 - cfg.repace) * d.total_pacing and cap is not None
                and not link.pacing_limited):
            return replace(st, decision=replace(d, pacing_rate=max(1, total // d.lanes),
                                                reason=f"capacity fell: drain at {total:.4g} B/s"))
        return st
    if d.mode is Mode.UPPROBE:
        st = replace(st, probe_queue=max(st.probe_queue, q))
        # the estimate caught up with the probe's pacing, no queue: the link carried all of it, and riding it out
        # to upprobe_time only delays the next step (from a warm-up read at 0.75x, a bulk transfer's ladder
        # spent ~1.3 s under the link: 88-89 % of a 2 Gbit/s, 80 ms link over 3.9 s)
        caught_up = (cap is not None and d.total_pacing is not None and q <= cfg.drained_ratio
                     and cap >= (1 - cfg.repace) * d.total_pacing)
        if since >= cfg.upprobe_time or q > cfg.drain_ratio or link.overflowing or caught_up:
            if link.overflowing:
                return _drain(st, link, cfg, f"up-probe overflowed the queue ({link.loss_rate:.1%} loss, ratio "
                                             f"{q:.2f})")
            if q > cfg.drained_ratio:
                return _drain(st, link, cfg, f"up-probe filled a queue (ratio {q:.2f})")
            before = st.probe_base or (d.total_pacing or 0) / _upprobe_gain(cfg, st.upprobe_streak)
            # it paid: the estimate grew, or the lanes delivered more than it at no queue (the estimate's
            # goodput average lags an up-probe's ramp: a 1.1x probe on a link read at 0.64x delivered 1.07x
            # of the start but moved the estimate 1.3 %, and the next probe waited 1.5 s); probe on, further.
            # From a collapsed estimate a probe that paid says the link is coming back: re-probe it unpaced
            # at once, whatever the re-probes' hold (a run of 1.1x .. 1.5x steps from 2 % of the link took
            # 6-10 s to get back after a 10 s fault)
            grew = max(cap or 0.0, link.btl_bw)
            if cap is not None and grew > (1 + cfg.repace) * before:
                if _far_below_best(st, cap, cfg) and not _sharing(st, cfg, now):
                    return _reprobe(st, link, f"an up-probe from a collapsed estimate paid ({grew:.4g} B/s, the "
                                    f"best {st.best:.4g})")
                # paid less than half its step and made a queue: the link (or the sender, whose layers came at
                # half the link's rate, in bursts that queued) set the rate, and a bigger step would only
                # overflow the queue: at 0.97x of a 2 Gbit/s, 80 ms link a 1.2x probe delivered 1.06x, the 1.4x
                # one after it lost 2 % and the drain after that ran at half the link for 0.3 s; streaming
                # layers, 1.4-1.5x steps overflowed the queue on the layers' bursts (1340-9263 drops in 5 runs of
                # 10, none with this rule). A stream then cruises where the ladder stopped, 0.87-0.89x of the
                # link seen. (Not while the lanes get all the probe's pacing now: then the link carries it, and
                # what lags is the estimate, or a host stall held the probe's samples back; stopping there left
                # a 2 Gbit/s link paced at 0.8x of it for 2.6 s. Nor with no queue through the probe: then the
                # lanes' own ramp held them, BBR taking a raised cap over a cycle of 8 round trips; stopping
                # there left bursty requests paced at 0.67x of the link for 9 s, 1.57x the ideal per request)
                pacing = d.total_pacing or 0
                if (grew < before + (pacing - before) / 2 and not link.pacing_limited
                        and st.probe_queue > cfg.drained_ratio):
                    return _pace(replace(st, upprobe_streak=0), link, cfg, Mode.CRUISE,
                                 f"up-probe paid less than half its step ({grew:.4g} B/s, paced at {pacing:.4g})",
                                 new_mode=True)
                return _upprobe(replace(st, upprobe_streak=st.upprobe_streak + 1), link, cfg,
                                f"{'capacity' if cap >= grew else 'delivery'} grew to {grew:.4g} B/s")
            return _pace(replace(st, upprobe_streak=0), link, cfg, Mode.CRUISE, "up-probe done", new_mode=True)
        return st
    # CRUISE / POLITE
    if _underused(st, link, cfg) and since >= cfg.settle + cfg.judge_after and rested:
        return _reprobe(st, link, f"goodput {link.goodput:.4g} B/s below {cfg.recover_ratio:.0%} of the capacity "
                        f"{cap:.4g} on a clear link")
    if q <= cfg.drain_ratio or st.queue_at is None:  # (when a queue reading began; cleared without one)
        st = replace(st, queue_at=now if q > cfg.drain_ratio else None)
    persisted = st.queue_at is not None and now - st.queue_at >= cfg.queue_persist - 1e-9
    if since >= cfg.settle and q > cfg.drain_ratio and persisted and not _sharing(st, cfg, now):
        if cfg.polite and st.drained_at is not None and now - st.drained_at < cfg.polite_hold:
            # we drained it and paced under the capacity, yet the queue is back: someone else's
            return _pace(replace(st, competing_at=now), link, cfg, d.mode, f"queue back after a drain "
                         f"(ratio {q:.2f}): sharing", new_mode=True)
        return _drain(st, link, cfg, f"queueing ratio {q:.2f}")
    lanes = _lanes(d, link, cfg, _sharing(st, cfg, now), st.best)
    if since >= cfg.settle and lanes != d.lanes:
        return _pace(replace(st, decision=replace(d, lanes=lanes)), link, cfg, d.mode,
                     f"{lanes} lanes for the path", new_mode=True)
    clear = link.pacing_limited and q <= cfg.drained_ratio
    back = (st.delivered if clear and st.delivered and cap and not st.reprobes  # (re-probes own a collapse)
            and st.delivered > cap / cfg.pace_gain * _BACK_MARGIN else None)
    if back and since >= cfg.settle and not _sharing(st, cfg, now) and d.pacing_rate is not None:
        return _upprobe(replace(st, delivered=None), link, cfg, f"delivered {back:.4g} B/s unpaced", total=back)
    if st.unconfirmed is not None and cap is not None and cap < (1 - cfg.repace) * st.unconfirmed:
        st = replace(st, unconfirmed=None)  # the beforehand burst read the link high: nothing to hurry
    wait = (cfg.settle if st.unconfirmed is not None else cfg.upprobe_clear) if clear else cfg.upprobe_interval
    # (timed from when the cruise began: lanes the path asked for on the way settle, but do not start the wait
    # over; two such changes kept a 2 Gbit/s link paced at 0.8x of it for 2.6 s)
    cruising = since if st.mode_at is None else now - st.mode_at
    if (cap is not None and since >= cfg.settle and cruising >= wait and not _sharing(st, cfg, now)
            and d.pacing_rate is not None):
        return _upprobe(st, link, cfg, "")
    return _pace(st, link, cfg, d.mode, "", new_mode=False)


def _end_probe_on_overflow(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState:
    """PROBE ends before ``probe_min`` once the queue overflows (``LinkState.overflowing``: a standing
    queue and congestive loss): the link is full, the estimator's capacity is at least what it delivered,
    and every further round trip unpaced only drops packets (a re-probe's capacity is the collapsed
    one until the queue has stood: it waits for ``probe_min``). Lanes in STARTUP (BBR) or slow start
    (CUBIC) overshoot a shallow queue together: on 400 Mbit/s, 20 ms with a one-BDP queue, 4 BBR lanes
    left unpaced until ``probe_min`` lost a fifth of their packets for half a second, twenty times the
    link's random loss over a whole 9 s transfer. A capacity read low here costs an up-probe, not drops."""
    cap = link.capacity
    assert cap is not None
    return _pace(st, link, cfg, Mode.CRUISE, f"queue overflowing ({link.loss_rate:.1%} loss, ratio "
                 f"{link.queueing_ratio or 1.0:.2f}): paced under {cap:.4g} B/s", new_mode=True)


def _far_below_best(st: ControllerState, cap: float | None, cfg: ControllerConfig) -> bool:
    """The estimate ``cap`` is under ``recover_ratio`` of the best one of the last ``best_window``."""
    return cap is not None and st.best is not None and cap < cfg.recover_ratio * st.best


def _collapsed(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> bool:
    """The estimate fell far below the recent best, yet the lanes get all the pacing lets them, loss-free:
    the pacing, not the link, is the limit (a fault that ended, false low samples)."""
    cap, d = link.capacity, st.decision
    # a lane paced to a few packets a round trip waits for delayed ACKs: its srtt (and so any queue reading,
    # and whether goodput keeps up with the pacing) says nothing then
    tiny = d.pacing_rate is not None and d.pacing_rate * max(link.min_rtt or 0.0, 0.001) < 8 * MSS
    return (_far_below_best(st, cap, cfg)
            and (link.pacing_limited or tiny) and not link.app_limited
            and (link.loss_rate < cfg.recover_loss or tiny)  # (a few lost packets are a high rate of very few)
            and not _sharing(st, cfg, link.timestamp))


def _underused(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> bool:
    """BBR lanes with work queued, unheld by pacing, windows or a queue, deliver far below the capacity:
    their own bandwidth estimates are what is low (after a long stall BBR regrows by 25 % per eight round
    trips: minutes at 80 ms from a few packets). Only over a window in which the lanes were busy
    (``full_busy``): goodput averaged over a gap between requests is low without anything being slow, and
    re-probing then restarts every lane's BBR into STARTUP just as the next request's burst begins. And
    only with work queued on the lanes in that share of the window's samples (``LinkState.unqueued``): a
    prefill writing layers at half the link's rate keeps every lane busy (a chunk a round trip keeps data
    in flight) at half the capacity; re-probing it unpaced overflowed the queue mid-request (5354 drops,
    that request's tail 403 ms against 144-210 for the others)."""
    cap = link.capacity
    return (st.decision.congestion == "bbr" and cap is not None and link.goodput < cfg.recover_ratio * cap
            and link.busy >= cfg.full_busy and link.unqueued <= 1 - cfg.full_busy
            and (link.queueing_ratio or 1.0) <= cfg.drained_ratio and not link.app_limited
            and not link.pacing_limited and link.loss_rate < cfg.recover_loss
            and max(link.sndbuf_limited, link.rwnd_limited) < cfg.window_limited
            and not _sharing(st, cfg, link.timestamp))


def _reprobe(st: ControllerState, link: LinkState, why: str) -> ControllerState:
    """PROBE unpaced with every lane's algorithm restarted (BBR in STARTUP finds the link in a few round
    trips); its result becomes the best estimate."""
    d = st.decision
    return _to(replace(st, upprobe_streak=0, reprobed_at=link.timestamp, reprobes=st.reprobes + 1), link, Decision(
        d.lanes, None, d.congestion, Mode.PROBE, f"{why}: re-probing unpaced, lanes restarted", restart=True))


def _upprobe_gain(cfg: ControllerConfig, streak: int) -> float:
    return min(cfg.upprobe_gain_max, 1 + (cfg.upprobe_gain - 1) * 2 ** min(streak, 16))


def _upprobe(st: ControllerState, link: LinkState, cfg: ControllerConfig, why: str,
             total: float | None = None) -> ControllerState:
    """Pace above the capacity for up to ``upprobe_time``: ``total`` (bytes/s), else the streak's step."""
    d = st.decision
    total = int(total if total is not None else _upprobe_gain(cfg, st.upprobe_streak) * (link.capacity or 0))
    reason = f"{why + ': ' if why else ''}up-probe at {total:.4g} B/s"
    return _to(replace(st, probe_base=link.capacity, probe_queue=1.0, unconfirmed=None),
               link, Decision(d.lanes, max(1, total // d.lanes), d.congestion, Mode.UPPROBE, reason))


def _sharing(st: ControllerState, cfg: ControllerConfig, now: float) -> bool:
    return cfg.polite and st.competing_at is not None and now - st.competing_at < cfg.polite_hold


def _to(st: ControllerState, link: LinkState, d: Decision) -> ControllerState:
    moved = st.mode_at is None or d.mode is not st.decision.mode
    return replace(st, decision=d, changed_at=link.timestamp, mode_at=link.timestamp if moved else st.mode_at)


def _drain_rate(link: LinkState, cfg: ControllerConfig) -> int:
    """Aggregate pacing that empties the standing queue in about ``drain_time`` (0: nothing to go on).
    Alone, the capacity follows the queue down; sharing it does not, so goodput bounds it there."""
    base = min(link.capacity, link.goodput) if link.capacity and cfg.polite else link.capacity or link.goodput
    if base <= 0:
        return 0
    excess = ((link.queueing_ratio or 1.0) - 1) * (link.min_rtt or 0.0)  # seconds of queue at the link rate
    if link.max_queue is not None:  # (no deeper than the bottleneck's buffer: the rest is delay elsewhere)
        excess = min(excess, link.max_queue)
    gain = min(cfg.drain_gain_max, max(cfg.drain_gain, 1 - excess / cfg.drain_time))
    return int(gain * base)


def _drain(st: ControllerState, link: LinkState, cfg: ControllerConfig, why: str) -> ControllerState:
    d = st.decision
    total = _drain_rate(link, cfg)
    if total <= 0:
        return st
    nd = Decision(d.lanes, max(1, total // d.lanes), d.congestion, Mode.DRAIN, f"{why}: drain at {total:.4g} B/s")
    return _to(replace(st, upprobe_streak=0, unconfirmed=None), link, nd)


def _pace(st: ControllerState, link: LinkState, cfg: ControllerConfig, mode: Mode, why: str,
          new_mode: bool) -> ControllerState:
    """Pace the aggregate at the cruising rate for the current capacity (and sharing state)."""
    d = st.decision
    cap = link.capacity
    mode = Mode.POLITE if cfg.polite and mode in (Mode.CRUISE, Mode.POLITE) else mode
    if cap is None:  # nothing measured to pace under (a drain's cap must not outlive it)
        nd = replace(d, mode=mode, pacing_rate=None, reason=why or d.reason)
        return _to(st, link, nd) if new_mode else replace(st, decision=nd)
    sharing = _sharing(st, cfg, link.timestamp)
    gain = cfg.polite_share if sharing else cfg.pace_gain
    rate = max(1, int(gain * cap) // d.lanes)
    if (not new_mode and d.mode is mode and d.pacing_rate is not None
            and abs(rate - d.pacing_rate) <= cfg.repace * d.pacing_rate):
        return st  # the capacity estimate has not moved enough to re-pace
    if not why:
        why = (f"fair share {cfg.polite_share:.0%} of {cap:.4g} B/s" if sharing
               else f"paced at {gain:.0%} of {cap:.4g} B/s")
    nd = Decision(d.lanes, rate, d.congestion, mode, why)
    return _to(st, link, nd) if new_mode else replace(st, decision=nd)


def _grow_loss_bound(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState | None:
    """Add lanes while goodput grows, when the capacity is unknown because the lanes cannot fill the
    link: each is held near one loss-based flow's Mathis rate at the measured loss, with no queue (CUBIC
    under random loss never builds the standing queue that would tell the capacity). The first step aims
    at the fastest rate seen (``btl_bw``: slow start got there before the losses), later ones add half the
    lanes again, each only once the last one raised goodput by ``grow_gain``. The mode does not change."""
    d, now = st.decision, link.timestamp
    rtt, loss, q = link.min_rtt, link.loss_rate, link.queueing_ratio or 1.0
    last = st.lanes_at if st.lanes_at is not None else st.changed_at
    if (link.capacity is not None or _sharing(st, cfg, now) or not rtt or loss <= 0 or d.lanes >= cfg.max_lanes
            or d.mode not in (Mode.PROBE, Mode.CRUISE, Mode.POLITE) or q > cfg.drained_ratio
            or link.rwnd_limited > cfg.rwnd_limited or last is None or now - last < cfg.settle + cfg.judge_after):
        return None
    per_lane = mathis_rate(rtt, loss)
    if link.goodput > 2 * per_lane * max(d.lanes, len(link.lanes)):  # (a LaneGroup's members each run d.lanes)
        return None  # the lanes beat the Mathis bound: not loss-bound (BBR, or loss too rare to matter)
    if st.grown_from is not None and link.goodput < (1 + cfg.grow_gain) * st.grown_from:
        return None  # the last step did not pay
    target = 1.5 * link.goodput if st.grown_from is not None else max(link.btl_bw, 1.5 * link.goodput)
    want = min(cfg.max_lanes, max(math.ceil(target / per_lane), math.ceil(1.5 * d.lanes)))
    why = (f"{want} lanes: {d.lanes} loss-bound lanes ({loss:.2%} loss: {per_lane * 8e-6:.3g} Mbit/s each) "
           f"carried {link.goodput * 8e-6:.4g} Mbit/s")
    return replace(st, decision=replace(d, lanes=want, reason=why), lanes_at=now, grown_from=link.goodput)


def _grow_window_bound(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState | None:
    """Add lanes while the lanes are held by their socket windows (``sndbuf_limited``: ``tcp_wmem[2]``
    over a long path; ``rwnd_limited``: the peer's ``tcp_rmem[2]``) with no queue at the bottleneck, and
    while each step raised goodput by ``grow_gain``: then the sockets, not the link, are the limit (4 MiB
    over 80 ms is ~265 Mbit/s a lane). Doubles the lanes per step (up to ``max_lanes``); the capacity the
    queue of the wider aggregate then shows paces them, so more lanes never flood the queue."""
    d, now = st.decision, link.timestamp
    q = link.queueing_ratio or 1.0
    last = st.lanes_at if st.lanes_at is not None else st.changed_at
    limited = max(link.sndbuf_limited, link.rwnd_limited)
    if (limited < cfg.window_limited or d.lanes >= cfg.max_lanes or _sharing(st, cfg, now) or link.app_limited
            or d.mode not in (Mode.PROBE, Mode.CRUISE, Mode.POLITE) or q > cfg.drained_ratio or last is None
            or now - last < cfg.settle + cfg.judge_after or link.pacing_limited):
        return None
    if st.grown_from is not None and link.goodput < (1 + cfg.grow_gain) * st.grown_from:
        return None  # the last step did not pay
    want = min(cfg.max_lanes, 2 * d.lanes)
    which = "send-buffer" if link.sndbuf_limited >= link.rwnd_limited else "receive-window"
    why = (f"{want} lanes: {d.lanes} lanes {which}-limited {limited:.0%} of the time, no queue, "
           f"{link.goodput * 8e-6:.4g} Mbit/s")
    return replace(st, decision=replace(d, lanes=want, reason=why), lanes_at=now, grown_from=link.goodput)


def _lanes(d: Decision, link: LinkState, cfg: ControllerConfig, sharing: bool, best: float | None = None) -> int:
    """Lanes the path needs (see the module docstring), with hysteresis against the current count; BBR
    lanes never shrink below what the recent ``best`` capacity needs (a collapsed estimate would otherwise
    leave too few socket windows to recover into)."""
    cap, rtt = link.capacity, link.min_rtt
    if cap is None or not rtt or sharing or (link.queueing_ratio or 1.0) > cfg.drained_ratio:
        return d.lanes  # sharing, or loss that a queue explains: congestive, not a reason for lanes
    if d.congestion == "bbr":
        want = window_lanes(max(cap, best or 0.0), rtt, cfg.lane_window)
    else:
        want = loss_lanes(max(cap, best or 0.0), rtt, link.loss_rate)
    want = max(cfg.min_lanes, min(cfg.max_lanes, want))
    if want > d.lanes and link.rwnd_limited <= cfg.rwnd_limited:
        return want
    if want < d.lanes / 2 and d.congestion == "bbr":
        return max(want, d.lanes // 2)
    # Loss-based lanes never shrink on the Mathis rule: the loss they measure after a step up rises
    # with their own number (it moves with them), and spare lanes cost nothing under aggregate pacing.
    return d.lanes
