"""Recording a ``LinkControl``'s states, for tests and benchmarks (the library keeps no history of them).

Owns: ``record(control)``, which subscribes a list to every ``LinkState`` the controller publishes from then
on, and ``recorded(control)``, that list (``[]`` for a controller never recorded). The lists live as long
as their controller. Must not know: the policy or the estimator's internals; it only subscribes.
"""

from __future__ import annotations

import threading
import weakref

from ..congestion.control import LinkControl
from ..congestion.estimator import LinkState

_lists: weakref.WeakKeyDictionary[LinkControl, list[LinkState]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def record(control: LinkControl) -> list[LinkState]:
    """Keep every state ``control`` publishes from now on (appended on its monitor thread, after the
    policy has seen it); returns the list. Recording the same controller twice returns the same list."""
    with _lock:
        states = _lists.get(control)
        if states is not None:
            return states
        states = _lists[control] = []
    control.subscribe(states.append)
    return states


def recorded(control: LinkControl) -> list[LinkState]:
    """The states ``record`` has kept for ``control`` so far (``[]`` if it was never recorded)."""
    with _lock:
        return _lists.get(control, [])


__all__ = ["record", "recorded"]
