"""SIGTERM and SIGHUP as an exception, so a process tears down what it built as it does on Ctrl-C.

Owns: ``Terminated`` (a ``KeyboardInterrupt``: whatever already cleans up after Ctrl-C — ``with`` blocks,
``finally``, pytest's fixture teardown — runs for these too) and ``install()``, which makes SIGTERM and
SIGHUP raise it in the main thread. Python's default for both is to die at once, leaving child processes,
network namespaces and files behind. Also ``pid_alive``, the one check that a process is still there (the
launcher's ``down``/``status`` and the teardown tests use it). Must not know: what is being torn down.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGHUP); exit status ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def install(force: bool = False) -> bool:
    """From the main thread: SIGTERM and SIGHUP raise ``Terminated`` there. A signal with a handler of
    its own (not the default, not ignored) keeps it unless ``force``. Returns whether anything was
    installed (False off the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    done = False
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if force or current in (signal.SIG_DFL, None) or current is _raise:
            signal.signal(sig, _raise)
            done = True
    return done


__all__ = ["SIGNALS", "Terminated", "install"]


def pid_alive(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie (a zombie is gone for every purpose here: its parent
    only has not reaped it yet). One owned by another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
