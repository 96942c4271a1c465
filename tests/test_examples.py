"""The example pair runs as documented: a decode receiver and a prefill sender, as two processes on
loopback, every byte checked by the receiver; ``--wan`` probes the link and runs under LinkControl."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
