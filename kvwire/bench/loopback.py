"""``--loopback``: a one-off bench server in a child process on 127.0.0.1, and the client against it.

(``--emulate`` starts the same server through ``ip netns exec`` on the emulated link's server side.)

Owns: the server's command line (ephemeral ports, the key passed through the environment, never argv),
waiting for its "Server listening" line, relaying its output with ``-v`` and stopping it. A process,
not a thread: the receiver gets its own interpreter (no GIL shared with the sender) and its own
``getrusage``, so the CPU figures of each side are honest. Must not know: the test itself.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from typing import IO

from .errors import BenchError
from .options import KEY_ENV, Options

LISTENING = re.compile(r"Server listening on (\S+) port (\d+)")
START_TIMEOUT = 60.0


def server_command(o: Options, bind: str = "127.0.0.1") -> list[str]:
    argv = [sys.executable, "-m", "kvwire.bench", "-s", "-1", "-B", bind, "-p", "0",
            "--data-port", "0", "--pool-bytes", str(o.pool_bytes)]
    if o.verify_seed is not None:
        argv += ["--verify-seed", str(o.verify_seed)]
    if o.tls_cert and o.tls_key:
        argv += ["--tls-cert", o.tls_cert, "--tls-key", o.tls_key]
    return argv


class LoopbackServer:
    """Context manager: ``port`` is the server's control port once entered. ``prefix`` runs the server
    through a wrapper (``ip netns exec NS`` for ``--emulate``), listening on ``bind``."""

    def __init__(self, o: Options, bind: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        self.o = o
        self.port = 0
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", KEY_ENV: o.key.decode()}
        self.proc = subprocess.Popen((prefix or []) + server_command(o, bind), stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env, text=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        for line in pipe:
            self.lines.append(line.rstrip("\n"))
            if self.o.verbose:
                sys.stderr.write(f"[server] {line}")
            self._q.put(line)
        self._q.put(None)

    def __enter__(self) -> LoopbackServer:
        try:
            return self._wait_listening()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) while it starts: __exit__ will not run
            self.stop(0.5)
            raise

    def _wait_listening(self) -> LoopbackServer:
        while True:
            try:
                line = self._q.get(timeout=START_TIMEOUT)
            except queue.Empty:
                self.stop()
                raise BenchError(f"the loopback server did not start within {START_TIMEOUT:.0f} s") from None
            if line is None:
                self.stop()
                raise BenchError(f"the loopback server exited (status {self.proc.poll()}): "
                                 + " | ".join(self.lines[-5:]))
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(2))
                return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # after its test the one-off server exits by itself; interrupted or failed, it is stopped now
        self.stop(10.0 if exc_type is None else 0.5)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Wait for the one-off server to exit after its test; terminate it if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
