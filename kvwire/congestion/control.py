"""``LinkControl``: the adaptive link controller attached to one sending session.

Owns: wiring a ``LinkMonitor`` (TCP_INFO of the session's active lanes every ``interval``), its
``LinkEstimator`` and a ``LaneController`` to the session's three hooks — ``lane_sockets()`` (what to
sample and pace), ``set_active_lanes(n)`` (the lane count) and ``on_lane_open`` (a lane connected or
reconnected gets the current pacing cap and algorithm before it carries data) — and publishing every
``LinkState`` to subscribers. Must not know: transfers, the wire format, how the session picks chunks;
the session is used only through those hooks (a duck-typed ``Controllable``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol

from .controller import ControllerConfig, Decision, LaneController, apply_decision
from .estimator import EstimatorConfig, LinkEstimator, LinkState
from .monitor import LinkMonitor, Subscriber


class Controllable(Protocol):
    """What ``LinkControl`` needs of a session (``kvwire.Session`` has it)."""

    on_lane_open: Callable[[int, socket.socket], None] | None

    def lane_sockets(self) -> list[socket.socket]: ...

    def set_active_lanes(self, n: int) -> int: ...


class LinkControl:
    """``ctl = LinkControl(session)``; ``ctl.subscribe(cb)``; ``ctl.latest()``; ``ctl.close()``.

    Starts in PROBE (lanes unpaced, the configured algorithm — BBR by default — finds the bottleneck
    with the first traffic), then paces the aggregate just under the estimated capacity; see
    ``controller`` for the policy. ``config.polite`` makes it yield to competing flows. ``capacity``
    (bytes/s of TCP payload), when known from ``kvwire.probe`` or an earlier run, seeds the estimate and
    skips the in-band PROBE: the lanes are paced under it from the first byte.
    """

    def __init__(self, session: Controllable, config: ControllerConfig | None = None, *,
                 interval: float = 0.1, estimator: EstimatorConfig | None = None,
                 capacity: float | None = None, start: bool = True) -> None:
        self.session = session
        self.config = config or ControllerConfig()
        self.estimator = LinkEstimator(estimator or EstimatorConfig(
            bw_sample=0.2, capacity_follows_queue=not self.config.polite))
        if capacity is not None:
            self.estimator.seed_capacity(capacity)
        self.controller = LaneController(self.config, session.lane_sockets, self._set_lanes, capacity)
        self.monitor = LinkMonitor(session.lane_sockets, interval, self.estimator)
        self.states: list[LinkState] = []  # kept only while record=True (benchmarks)
        self.record = False
        session.on_lane_open = self._on_lane_open
        session.set_active_lanes(self.config.initial_lanes)
        apply_decision(self.decision, session.lane_sockets())
        self.monitor.subscribe(self.controller.on_state)
        self.monitor.subscribe(self._keep)
        if start:
            self.monitor.start()

    @property
    def decision(self) -> Decision:
        return self.controller.decision

    @property
    def history(self) -> list[tuple[float, Decision]]:
        """``(LinkState timestamp, decision)`` for every change of decision."""
        return list(self.controller.history)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """``callback(LinkState)`` after every sample (on the monitor thread); returns unsubscribe."""
        return self.monitor.subscribe(callback)

    def latest(self) -> LinkState | None:
        return self.monitor.latest()

    def close(self) -> None:
        """Stop sampling and detach from the session (the sockets keep their last settings)."""
        self.monitor.stop()
        if self.session.on_lane_open == self._on_lane_open:
            self.session.on_lane_open = None

    def __enter__(self) -> LinkControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ hooks
    def _set_lanes(self, n: int) -> int:
        return self.session.set_active_lanes(n)

    def _on_lane_open(self, index: int, sock: socket.socket) -> None:
        d = self.decision  # its share of the aggregate, counting it among the lanes that pace (at least d.lanes)
        apply_decision(d, [sock], share=max(d.lanes, len(self.session.lane_sockets()) + 1))

    def _keep(self, state: LinkState) -> None:
        if self.record:
            self.states.append(state)

