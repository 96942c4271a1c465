"""The PrfaaS deployment config (kvwire/prfaas/config.py): TOML round trip and typed errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvwire.prfaas import config as cfg

TEXT = """
[model]
seed = 3
[model.hf]
hidden_size = 64

[cache]
block_size = 32

[[nodes]]
name = "p0"
cluster = "prfaas"
role = "prefill"
control_port = 9101
data_port = 9201

[[nodes]]
name = "d0"
cluster = "local"
role = "decode"
host = "127.0.0.1"
control_port = 9102
data_port = 9202

[router]
threshold = 1000

[front]
port = 8000
"""


def test_load_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "deploy.toml"
    p.write_text(TEXT)
    c = cfg.load(p)
    assert c.model.seed == 3 and c.model.hf["hidden_size"] == 64 and c.model.hf["num_hidden_layers"] == 8
    assert c.cache.block_size == 32 and c.node("d0").control_url == "http://127.0.0.1:9102"
    assert [n.name for n in c.by(role="prefill")] == ["p0"] and c.node("p0").host == "127.0.0.1"
    assert c.router == {"threshold": 1000} and c.extra == {"front": {"port": 8000}}
    p2 = tmp_path / "again.toml"
    p2.write_text(cfg.to_toml(c))
    c2 = cfg.load(p2)
    assert (c2.model, c2.cache, c2.nodes, dict(c2.router), dict(c2.extra)) == \
        (c.model, c.cache, c.nodes, dict(c.router), dict(c.extra))


@pytest.mark.parametrize("bad, match", [
    (TEXT.replace('role = "decode"', 'role = "both"'), "role"),
    (TEXT.replace('cluster = "local"', 'cluster = "mars"'), "cluster"),
    (TEXT.replace("data_port = 9202", "data_port = 9201"), "used twice"),
    (TEXT.replace('name = "d0"', 'name = "p0"'), "duplicate"),
    (TEXT.replace("control_port = 9102", 'control_port = "x"'), "control_port"),
    (TEXT.replace("control_port = 9102", "control_port = 70000"), "not a TCP port"),
    (TEXT.replace("seed = 3", "seed = 3\ncolour = 1"), "unknown keys"),
    (TEXT.replace('cluster = "local"\nrole = "decode"', 'cluster = "prfaas"\nrole = "decode"'), "prefill only"),
    ("[model", "not valid TOML"),
])
def test_bad_config_is_a_typed_error(tmp_path: Path, bad: str, match: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(bad)
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(p)


def test_missing_file_and_unknown_node(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "none.toml")
    (tmp_path / "d.toml").write_text(TEXT)
    with pytest.raises(cfg.ConfigError, match="no node named"):
        cfg.load(tmp_path / "d.toml").node("zz")
