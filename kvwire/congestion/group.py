"""``LaneGroup``: several sending sessions that share one bottleneck, driven by one ``LinkControl``.

Owns: the member list; which members' lanes are sampled and paced (those of busy members: an idle
session's lanes would read as app-limited and take a share of the pacing they do not use); passing the
lane count and the lane-open hook on to every member, also to those that join later. Must not know:
transfers, the wire format, the policy. Members are used through the ``Controllable`` hooks plus ``busy``.

Two sessions each under its own ``LinkControl`` on one link both use it, but each sees only its own
goodput: the split stays wherever the second one's probe left it (the controllers step their rates by
factors, so nothing pulls them to equal shares). One ``LinkControl`` over a ``LaneGroup`` measures and
paces the members' lanes together, and splits the aggregate pacing evenly over the lanes that have work.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from .._args import check_int

#: called with (lane index, socket) each time a session's lane connects (opened, reopened or reconnected),
#: before it carries data: where congestion control applies pacing and the congestion algorithm. Lanes are
#: dialled concurrently, so it may run on several threads at once. (``kvwire.tcp`` takes it as ``on_lane_open``.)
LaneHook = Callable[[int, socket.socket], None]


class Member(Protocol):
    """What ``LaneGroup`` needs of a session (``kvwire.Session`` has it). The group's lane-open hook goes in
    the member's ``set_control_hooks`` slot where it has one (``kvwire.Session``), else in ``on_lane_open``."""

    on_lane_open: LaneHook | None

    @property
    def busy(self) -> bool: ...

    def lane_sockets(self) -> list[socket.socket]: ...

    def set_active_lanes(self, n: int) -> int: ...


class LaneGroup:
    """``group = LaneGroup([s1, s2])``; ``LinkControl(group)``; ``group.add(s3)``; ``group.remove(s1)``.

    A ``Controllable``: ``lane_sockets()`` are the lanes of the members that are busy now;
    ``set_active_lanes(n)`` gives every member ``n`` lanes (the aggregate pacing bounds them all, so a
    member's spare lanes cost nothing) and returns the fewest any member could open.
    """

    def __init__(self, members: Iterable[Member] = ()) -> None:
        self._lock = threading.Lock()
        self._members: list[Member] = []
        self._lanes: int | None = None
        self._hook: LaneHook | None = None
        for m in members:
            self.add(m)

    @property
    def on_lane_open(self) -> LaneHook | None:
        return self._hook

    @on_lane_open.setter
    def on_lane_open(self, hook: LaneHook | None) -> None:
        with self._lock:
            old, self._hook = self._hook, hook
            members = list(self._members)
        for m in members:  # (== not is: a bound method is a new object at each access)
            if _hook_of(m) is None or _hook_of(m) == old:
                _set_hook(m, hook)
        if hook is not None:
            for m in members:
                _through(hook, m)

    @property
    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members)

    def add(self, member: Member) -> None:
        """Join ``member``: it gets the group's lane count and hook now; its lanes are sampled and paced
        from the first sample in which it is busy."""
        detach = getattr(member, "detach_link_control", None)
        if callable(detach):
            detach()  # its own default controller hands its lanes over to the group's
        with self._lock:
            if any(m is member for m in self._members):
                return
            self._members.append(member)
            lanes, hook = self._lanes, self._hook
        if hook is not None:
            _set_hook(member, hook)
        if lanes is not None:
            member.set_active_lanes(lanes)
        if hook is not None:
            _through(hook, member)

    def remove(self, member: Member) -> None:
        """Leave: no longer sampled or paced (its sockets keep their last pacing), hook detached."""
        with self._lock:
            self._members = [m for m in self._members if m is not member]
            hook = self._hook
        if hook is not None and _hook_of(member) == hook:
            _set_hook(member, None)

    def lane_sockets(self) -> list[socket.socket]:
        return [s for m in self.members if m.busy for s in m.lane_sockets()]

    def set_active_lanes(self, n: int) -> int:
        """Give every member, and each that joins later, ``n`` lanes; returns the fewest any member could open
        (``n`` with none). ``n``: an ``int`` >= 1, checked here as ``Session.set_active_lanes`` does
        (``TypeError``/``ValueError`` naming ``n``, nothing changed; before, it was kept for later members and
        failed at the first member, or was returned as it came with none)."""
        n = check_int("n", n, 1)
        with self._lock:
            self._lanes = n
            members = list(self._members)
        got = [m.set_active_lanes(n) for m in members]
        return min(got, default=n)


def _hook_of(member: Member) -> LaneHook | None:
    """The group's hook as ``member`` holds it: in its controller slot (``kvwire.Session.set_control_hooks``:
    its user's ``on_lane_open`` stays its own and runs after it), else its ``on_lane_open``."""
    hooks = getattr(member, "control_hooks", None)
    return hooks[0] if hooks is not None else member.on_lane_open


def _set_hook(member: Member, hook: LaneHook | None) -> None:
    setter = getattr(member, "set_control_hooks", None)
    if callable(setter):
        setter(hook, None)
    else:
        member.on_lane_open = hook


def _through(hook: LaneHook, member: Member) -> None:
    """Put ``member``'s open lanes, busy or idle, through the lane-open hook: they are paced from now,
    not from the first sample that sees them busy (their first transfer would go out unpaced)."""
    for i, sock in enumerate(member.lane_sockets()):
        hook(i, sock)
