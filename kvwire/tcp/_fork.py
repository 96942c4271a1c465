"""A forked child and the transport objects it inherited from its parent.

Owns: ``check_process`` and ``forked``, what a ``Session``, ``Receiver`` or transfer handle asks before it
acts: each belongs to the process that opened it. A child forked from that process holds copies of its
sockets but none of its threads (nothing there reads acks, heartbeats or results), so in the child a call
that would write to the parent's connections or wait on its threads is a ``KvwireError`` at once, and
``close()`` leaves the parent's connections alone (no BYE, no socket shutdown: both would end the parent's
sessions). Must not know anything else.
"""

from __future__ import annotations

import os

from ..errors import KvwireError


def forked(pid: int) -> bool:
    """This process is not ``pid`` (the one that opened the object): a child forked from it."""
    return os.getpid() != pid


def check_process(pid: int, what: str) -> None:
    """``KvwireError`` in a process forked from ``pid``: ``what`` (a session, ...) belongs to ``pid``."""
    if forked(pid):
        raise KvwireError(f"this {what} belongs to process {pid}; process {os.getpid()} was forked from it and "
                          f"shares its sockets but none of its threads: open a new one here")
