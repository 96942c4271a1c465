"""The C WAN emulator: built on demand into a cache (concurrent builders safe), the backend choice, and the
binary's control channel against the Python reference's (same ready line, same stats keys, same refusals).

The build tests need a C compiler; the control-channel tests run both emulators for real in a network
namespace of their own (root, iproute2), with no packets: link behaviour is tests/test_wan.py's, per backend.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvwire.testing import cemu, netns
from kvwire.testing.wan import WanLink

NEEDS_CC = pytest.mark.skipif(cemu.compiler() is None, reason="no C compiler")
_NS_REASON = netns.unavailable_reason()
ROOT = str(Path(__file__).resolve().parents[1])
CONFIG = {"directions": {"c2s": {"queue": 0, "rate_bps": 1e8, "delay": 0.005, "loss": 0.0, "queue_bytes": 100000},
                         "s2c": {"queue": 1, "rate_bps": 1e8, "delay": 0.005, "loss": 0.01, "queue_bytes": 100000}},
          "seed": 5, "gso": False, "realtime": False}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "kvwire"


@NEEDS_CC
def test_concurrent_builds_share_one_cached_binary(cache: Path) -> None:
    results: list[Path | None] = []
    threads = [threading.Thread(target=lambda: results.append(cemu.build())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and len(set(results)) == 1
    binary = results[0]
    assert binary is not None and binary.parent == cache and os.access(binary, os.X_OK)
    assert sorted(p.name for p in cache.iterdir()) == [binary.name]  # no temporary file left
    mtime = binary.stat().st_mtime_ns
    assert cemu.build() == binary and binary.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert binary.name == "wanemu-" + cemu.binary_path().name.split("-")[1]


def test_the_binary_hash_covers_every_source_file_the_build_reads(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file ``wanemu.c`` includes by quotes is in ``cemu.SOURCES`` (shipped with it), and an edit to any
    of them names another binary: a stale cached build is never run for changed sources."""
    import re

    included = set(re.findall(r'^#include "([^"]+)"', cemu.SOURCE.read_text(), re.M))
    assert included and {p.name for p in cemu.SOURCES} == {cemu.SOURCE.name} | included
    assert all(p.parent == cemu.SOURCE.parent and p.is_file() for p in cemu.SOURCES)
    copies = tuple(tmp_path / p.name for p in cemu.SOURCES)
    for src, dst in zip(cemu.SOURCES, copies):
        dst.write_bytes(src.read_bytes())
    monkeypatch.setattr(cemu, "SOURCES", copies)
    names = {cemu.binary_path().name}
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n")
        names.add(cemu.binary_path().name)
    assert len(names) == 1 + len(copies)


def test_no_compiler_means_python_unless_c_is_demanded(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    assert cemu.build() is None
    argv, backend = cemu.emulator_command("auto")
    assert backend == "python" and argv[1:] == ["-m", "kvwire.testing.emulator"]
    with pytest.raises(cemu.EmulatorBuildError, match="needs a C compiler"):
        cemu.emulator_command("c")


def test_a_failing_compiler_is_reported_for_c_and_falls_back_for_auto(
        cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(cemu.EmulatorBuildError, match="false failed"):
        cemu.emulator_command("c")
    assert cemu.emulator_command("auto")[1] == "python"
    assert "using the Python WAN emulator" in capsys.readouterr().err
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing half-built left in the cache


def test_backend_choice_is_checked_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cemu.BACKEND_ENV, raising=False)
    assert WanLink().emulator == "auto"  # C when it builds
    with pytest.raises(ValueError, match="one of auto, c, python"):
        WanLink(emulator="rust")
    monkeypatch.setenv(cemu.BACKEND_ENV, "fortran")
    with pytest.raises(ValueError, match="KVWIRE_WAN_EMULATOR"):
        WanLink()
    monkeypatch.setenv(cemu.BACKEND_ENV, "python")
    assert WanLink().emulator == "python" and WanLink(emulator="c").emulator == "c"


class _Emulator:
    """One emulator process (either backend) in a namespace, spoken to over its control lines."""

    def __init__(self, ns: str, argv: list[str], config: dict[str, Any]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(netns.exec_prefix(ns) + argv + [json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return dict(json.loads(self.proc.stdout.readline()))

    def ask(self, raw: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(raw + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> int:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode


@pytest.fixture
def namespace() -> Iterator[str]:
    if _NS_REASON is not None:
        pytest.skip(_NS_REASON)
    ns = "kvc" + secrets.token_hex(3)
    netns.create(ns)
    try:
        yield ns
    finally:
        netns.delete(ns)


def _shape(value: Any) -> Any:
    """The keys of nested dicts (values' types for leaves: int vs float matters to no reader)."""
    return {k: _shape(v) for k, v in value.items()} if isinstance(value, dict) else "leaf"


@NEEDS_CC
@pytest.mark.netns
def test_c_and_python_speak_the_same_control_channel(namespace: str) -> None:
    c_bin = cemu.build()
    assert c_bin is not None
    replies: dict[str, list[dict[str, Any]]] = {}
    lines = ['{"op": "stats"}', '{"op": "update", "direction": "c2s", "loss": 0.5, "delay": null}',
             '{"op": "update", "loss": 1.5}', '{"op": "update", "rate_bps": 0}', '{"op": "update", "direction": "up"}',
             '{"op": "warp"}', 'not json', '{"op": "update", "queue_bytes": 5000, "rate_bps": 2e6}',
             '{"op": "stats"}', '{"op": "stop"}']
    for backend, argv in (("c", [str(c_bin)]), ("python", [sys.executable, "-m", "kvwire.testing.emulator"])):
        emu = _Emulator(namespace, argv, CONFIG)  # one at a time: each binds queues 0 and 1
        try:
            ready = emu.line()
            assert ready["ok"] and ready["ready"] and ready["pid"] > 0
            replies[backend] = [emu.ask(raw) for raw in lines]
        finally:
            assert emu.close() == 0  # exited by itself on "stop", after unbinding its queues
    c, py = replies["c"], replies["python"]
    assert c[0]["stats"]["backend"] == "c" and py[0]["stats"]["backend"] == "python"
    assert _shape(c[0]) == _shape(py[0]) and _shape(c[-2]) == _shape(py[-2])
    assert set(c[0]["stats"]) == {"c2s", "s2c", "turns", "late_max_ms", "late_releases", "late_5ms", "backend"}
    assert c[0]["stats"]["c2s"]["kernel"]["waiting"] == 0  # the kernel's own queue line was found
    for raw, mine, ref in zip(lines[1:-2], c[1:-2], py[1:-2]):
        if raw == "not json":  # both refuse it, each in its parser's words
            assert not mine["ok"] and not ref["ok"] and "ValueError" in mine["error"]
        else:  # the same answer, word for word
            assert mine == ref, raw
    assert c[-1] == py[-1] == {"ok": True, "stop": True}


@NEEDS_CC
@pytest.mark.netns
def test_c_emulator_refuses_a_bad_config_with_a_reason_and_exits_on_eof(namespace: str) -> None:
    c_bin = cemu.build()
    assert c_bin is not None
    for config, why in (({"directions": {"c2s": {"queue": 0, "rate_bps": -1, "delay": 0, "queue_bytes": 1}}},
                         "rate must be positive"),
                        ({}, "directions"), ({"directions": [1]}, "arrays")):
        emu = _Emulator(namespace, [str(c_bin)], config)
        try:
            reply = emu.line()
            assert not reply["ok"] and why in reply["error"]
        finally:
            assert emu.close() == 1
    emu = _Emulator(namespace, [str(c_bin)], CONFIG)
    assert emu.line()["ready"]
    assert emu.proc.stdin is not None
    emu.proc.stdin.close()  # the parent went away: the emulator leaves on its own
    assert emu.proc.wait(5) == 0
    emu.close()
