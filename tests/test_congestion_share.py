"""LinkShare: controllers of several processes on one path split it evenly (records in files, water-filled)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvwire.congestion.share import SHARE_ENV, LinkShare, Peer, fair_share, share_name

NOW = 1000.0


def peer(goodput: float, capacity: float | None = None, wants: bool = True) -> Peer:
    return Peer(goodput, capacity, wants, NOW)


def test_fair_share_water_fills_the_link() -> None:
    # four hungry controllers on a 100-unit link (one measured it alone): 25 each, whatever they have now
    assert fair_share(peer(70, 100), [peer(10, 12), peer(10), peer(10)]) == pytest.approx(25)
    # one that is app-limited at 10 keeps it; the other three split the remaining 90
    assert fair_share(peer(40, 100), [peer(10, wants=False), peer(25), peer(25)]) == pytest.approx(30)
    # "satisfied" at more than the even share is counted as hungry: 4 x 25
    assert fair_share(peer(20, 100), [peer(60, wants=False), peer(10), peer(10)]) == pytest.approx(25)
    # the summed goodput beats stale capacity estimates: the link is at least what they all carry
    assert fair_share(peer(50, 40), [peer(50, 40)]) == pytest.approx(50)
    assert fair_share(peer(50), [peer(50)]) is None  # nothing measured anywhere: no cap


def test_records_cross_processes_expire_and_are_bounded(tmp_path: Path) -> None:
    a, b = LinkShare("x", root=str(tmp_path), ttl=1.0), LinkShare("x", root=str(tmp_path), ttl=1.0)
    other = LinkShare("y", root=str(tmp_path))
    try:
        now = time.time()
        a.publish(Peer(5.0, 10.0, True, now))
        b.publish(Peer(3.0, None, False, now))
        other.publish(Peer(9.0, 9.0, True, now))
        assert a.others(now) == [Peer(3.0, None, False, now)] and b.others(now) == [Peer(5.0, 10.0, True, now)]
        assert a.others(now + 2.0) == [], "stale records are not peers"
        # another process's record (a real child process, the same directory)
        code = ("import sys, time; from kvwire.congestion.share import LinkShare, Peer; "
                f"s = LinkShare('x', root={str(tmp_path)!r}); s.publish(Peer(7.0, 20.0, True, time.time())); "
                "print(s.me)")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert child.stdout.strip().split("-")[0] != str(os.getpid())
        assert sorted(p.goodput for p in a.others()) == [3.0, 7.0]
        (tmp_path / "x" / "junk.json").write_bytes(b"{" * 5000)  # oversized / unparsable: ignored
        (tmp_path / "x" / "bad.json").write_text('{"g": "x"}')
        assert sorted(p.goodput for p in a.others()) == [3.0, 7.0]
        torn = tmp_path / "x" / "1-1.json.tmp"  # a writer killed before its rename, long ago
        torn.write_bytes(b"")
        os.utime(torn, (now - 120, now - 120))
        a.others()
        assert not torn.exists()
    finally:
        for s in (a, b, other):
            s.close()
    left = sorted(os.listdir(tmp_path / "x"))
    assert a.me + ".json" not in left and b.me + ".json" not in left, "closing removes one's own record"
    assert not (tmp_path / "y").exists(), "the last one out removes the directory"


def test_share_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARE_ENV, raising=False)
    name = share_name("127.0.0.1")
    assert name is not None and name.endswith("-127.0.0.1")
    monkeypatch.setenv(SHARE_ENV, "egress/dc2")
    assert share_name("127.0.0.1") == "egress_dc2"
    monkeypatch.setenv(SHARE_ENV, "off")
    assert share_name("127.0.0.1") is None
