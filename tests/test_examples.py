"""The example pair runs as documented: a decode receiver and a prefill sender, as two processes on
loopback, every byte checked by the receiver; ``--wan`` probes the link and runs under LinkControl; and
the commands in their docstrings run as written."""

from __future__ import annotations

import ast
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import default_signals

import kvwire

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("wan", [False, True], ids=["plain", "wan"])
def test_prefill_sender_and_decode_receiver(wan: bool) -> None:
    model, requests = "qwen3-next-80b-a3b", 2
    rx = subprocess.Popen([sys.executable, str(EXAMPLES / "decode_receiver.py"), "--port", "0", "--key", "k",
                           "--model", model, "--count", str(requests)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert rx.stdout is not None
        first = rx.stdout.readline()
        m = re.search(r"listening on [\d.]+:(\d+)", first)
        assert m, first
        tx = subprocess.run([sys.executable, str(EXAMPLES / "prefill_sender.py"), "--port", m.group(1), "--key", "k",
                             "--model", model, "--tokens", "1024", "--requests", str(requests),
                             "--prefill-ms-per-layer", "1", *(["--wan"] if wan else [])],
                            capture_output=True, text=True, timeout=120)
        assert tx.returncode == 0, tx.stderr
        rest, _ = rx.communicate(timeout=60)
    finally:
        rx.kill()
        rx.wait()
    assert rx.returncode == 0, rest
    layers = sum(1 for layer in kvwire.load_layout(model).layers if layer.caches)
    assert len(re.findall(r"content verified", rest)) == requests and "MISMATCH" not in rest
    assert len(re.findall(rf"confirmed by the receiver .* {layers} layers acknowledged one by one", tx.stdout)) \
        == requests
    assert ("probe: capacity" in tx.stdout) == wan
    assert (len(re.findall(r"  link: \w+, \d+ lanes", tx.stdout)) == requests) == wan


def docstring_commands(script: Path) -> list[list[str]]:
    """The ``python examples/...`` commands of ``script``'s docstring (backslash continuations joined,
    trailing ``# comments`` dropped), as argument lists."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    joined = re.sub(r"\\\n\s*", " ", doc)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("python ")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_docstring_commands_run_as_written() -> None:
    """Every command in the examples' docstrings, as written but for one change: the documented port
    7400 becomes a free one (parallel test runs must not collide). The receiver runs until interrupted,
    as its docstring says: after both senders' transfers are verified it gets SIGINT and exits 0."""
    rx_cmds, tx_cmds = docstring_commands(EXAMPLES / "decode_receiver.py"), docstring_commands(
        EXAMPLES / "prefill_sender.py")
    assert len(rx_cmds) == 1 and len(tx_cmds) == 2, (rx_cmds, tx_cmds)
    port = str(_free_port())

    def adapt(cmd: list[str]) -> list[str]:
        assert cmd[0] == "python" and cmd[1].startswith("examples/"), cmd
        assert cmd[cmd.index("--port") + 1] == "7400", cmd
        return [sys.executable, *[port if a == "7400" else a for a in cmd[1:]]]

    root = EXAMPLES.parent
    with default_signals(signal.SIGINT):  # (heard even where this run ignores it: a shell's background job)
        rx = subprocess.Popen(adapt(rx_cmds[0]), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        assert rx.stdout is not None
        first = rx.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in first, first
        for cmd in tx_cmds:
            tx = subprocess.run(adapt(cmd), cwd=root, capture_output=True, text=True, timeout=240)
            assert tx.returncode == 0, f"{cmd}\n{tx.stdout[-2000:]}\n{tx.stderr[-2000:]}"
            assert "req-0:" in tx.stdout and "confirmed by the receiver" in tx.stdout, tx.stdout[-2000:]
        seen = []
        while len([x for x in seen if "content" in x]) < len(tx_cmds):
            line = rx.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        rx.send_signal(signal.SIGINT)
        rest, _ = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    out = "".join(seen) + rest
    assert rx.returncode == 0, out[-3000:]
    assert len(re.findall(r"content verified", out)) == len(tx_cmds) and "MISMATCH" not in out
