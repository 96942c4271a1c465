"""kvwire-bench --tp/--decode-tp: one run prints each decode rank's bytes beside the same-TP case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reshard_ref import FAMILY_CONFIGS

from kvwire.bench.cli import main


def test_decode_tp_reports_per_rank_bytes_beside_same_tp(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         no_leaks: None) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAMILY_CONFIGS["mamba2"]))  # GQA (2 KV heads) + Mamba2 (2 groups)
    rc = main(["--loopback", "--model", str(config), "--tp", "1", "--decode-tp", "4", "--tokens", "64", "-P", "1",
               "-J"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["verified"]
    resharded, same = doc["reshard"]["ranks"], doc["same_tp"]["ranks"]
    assert (doc["reshard"]["prefill_tp"], doc["reshard"]["decode_tp"], doc["same_tp"]["prefill_tp"]) == (1, 4, 4)
    assert len(resharded) == len(same) == 4
    for r, s in zip(resharded, same):
        assert r["wire_bytes"] == r["needed_bytes"] == s["wire_bytes"]  # no over-send: same bytes as same-TP
        assert r["whole_cache_bytes"] > r["wire_bytes"]  # TP1's whole cache would be 4x+ more
        assert r["from"] == {"0": r["wire_bytes"]}


def test_decode_tp_table_and_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path, no_leaks: None) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAMILY_CONFIGS["kda"]))
    assert main(["--loopback", "--model", str(config), "--tp", "4", "--decode-tp", "2", "--tokens", "32",
                 "-P", "1"]) == 0
    out = capsys.readouterr().out
    assert "wire B tp4->2" in out and "wire B tp2->2" in out and "decode rank 1: from prefill ranks" in out
    with pytest.raises(SystemExit):
        main(["-c", "127.0.0.1", "--model", str(config), "--decode-tp", "2"])  # needs --loopback
