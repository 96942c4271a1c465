"""The HF adapter's proof: prefill in process A, the cache streamed layer by layer through kvwire (real sockets),
decode in process B, for tiny models built from config (``initializer_range=0.5``, seeded, CPU): Qwen3-Next,
Jamba, Falcon-H1, Nemotron-H, Granite-4.0-H, Zamba2, Mamba2 and Llama, under both N and N-1.

What is compared: B's decode on the received cache against the *same split* computed in B alone (prefill of
the same tokens, then the same decode steps). A single ``generate()`` over the whole prompt is not the
reference: it runs the prompt's last token through the chunked scan where the split runs it through the
recurrent step, and those differ in the last bits. Asserted: every received tensor equals the local
prefill's bit for bit, the 32 steps' logits differ by exactly 0.0, the 32 greedy tokens are identical (and,
under N, A's first token is B's). Negative control: the same received cache with one layer's recurrent state
zeroed (Llama: layer 0's K) must move the logits by more than 1.0 and change the tokens; so the test can fail.

Two long-lived processes serve every case (one model build per process and model), which keeps this module
at ~20-40 s on two loaded cores.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

MODELS = ["qwen3_next", "jamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "zamba2", "mamba2", "llama"]
STEPS = 32
PROMPT = 12


class Peer:
    """A tests/hf_peer.py process spoken to in JSON lines, every read bounded by a deadline."""

    def __init__(self, *args: str) -> None:
        here = os.path.dirname(__file__)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "hf_peer.py"), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def read(self, timeout: float = 180.0) -> dict[str, Any]:
        try:
            out: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"peer {self.proc.args[2:]} silent for {timeout}s (rc={self.proc.poll()})") from None
        return out

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[Peer, Peer]]:
    decode = Peer("decode")
    prefill = None
    try:
        port = decode.read()["port"]
        prefill = Peer("prefill", str(port))
        assert prefill.read()["ok"]
        yield prefill, decode
    finally:
        if prefill is not None:
            prefill.close()
        decode.close()


@pytest.mark.parametrize("policy", ["N", "N-1"])
@pytest.mark.parametrize("model", MODELS)
def test_two_process_decode_is_bit_identical(peers: tuple[Peer, Peer], model: str, policy: str) -> None:
    prefill, decode = peers
    rid = f"{model}/{policy}"
    decode.send({"cmd": "expect", "model": model, "policy": policy, "rid": rid, "n": PROMPT})
    assert decode.read()["ok"]
    prefill.send({"model": model, "policy": policy, "rid": rid, "n": PROMPT})
    a = prefill.read()
    decode.send({"cmd": "decode", "rid": rid, "first_token": a["first_token"], "steps": STEPS})
    b = decode.read()
    early = sum(1 for t in b["layer_times"].values() if t < a["forward_end"])
    print(f"\n{model:17s} {policy:3s} tensors={b['tensors']:2d} max|dlogit|={b['max_diff']} "
          f"control({b['control']}): max|dlogit|={b['ctl_diff']:.2f}, "
          f"{sum(x != y for x, y in zip(b['ctl_tokens'], b['ref_tokens']))}/{STEPS} tokens differ; "
          f"{early}/{len(b['layer_times'])} layers verified in B before A's forward returned")
    assert a["layers_written"] == sorted(a["layers_written"]) and a["copies"] == 0
    assert b["bytes_equal"], "a received tensor differs from the same prefill computed in the decode process"
    if policy == "N":
        assert a["first_token"] == b["ref_first"]
    assert b["max_diff"] == 0.0
    assert len(b["tokens"]) == STEPS and b["tokens"] == b["ref_tokens"]
    assert b["ctl_diff"] > 1.0 and b["ctl_tokens"] != b["ref_tokens"], "the negative control changed nothing"
