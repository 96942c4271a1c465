"""Helpers for the PrfaaS deployment tests: a config on free loopback ports, the OpenAI client, metrics, pids."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import wait_until
from prfaas_nodes import free_ports
from prometheus_client.parser import text_string_to_metric_families

from kvwire.prfaas import config as deploy_config
from kvwire.termination import pid_alive as alive

DEFAULT = Path(__file__).resolve().parents[1] / "kvwire" / "prfaas" / "deploy-default.toml"


def write_config(path: Path, **router: Any) -> Path:
    """The shipped default config with every port replaced by a free one (tests run side by side)."""
    cfg = deploy_config.load(DEFAULT)
    ports = free_ports(2 * len(cfg.nodes) + 1)
    nodes = tuple(n.__class__(n.name, n.cluster, n.role, n.host, ports[2 * i], ports[2 * i + 1])
                  for i, n in enumerate(cfg.nodes))
    cfg = deploy_config.DeployConfig(cfg.model, cfg.cache, nodes, dict(cfg.router, port=ports[-1], **router),
                                     cfg.extra)
    path.write_text(deploy_config.to_toml(cfg))
    return path


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)



def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def stream_tokens(client: Any, prompt: Any, max_tokens: int, **headers: str) -> tuple[list[int], str, Any]:
    """Streamed completion → (token ids, text, the last chunk's ``prfaas`` summary)."""
    ids: list[int] = []
    text, summary = "", None
    stream = client.completions.create(model="kvwire-prfaas", prompt=prompt, max_tokens=max_tokens, stream=True,
                                       extra_headers=headers)
    for chunk in stream:
        extra = chunk.choices[0].model_extra or {}
        ids += extra.get("token_ids") or []
        text += chunk.choices[0].text
        summary = (chunk.model_extra or {}).get("prfaas", summary)
    return ids, text, summary


def get_json(url: str, timeout: float = 5.0) -> Any:
    """A front door's or node's JSON answer, also for an error status (its body says why)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """``cond()`` within ``timeout`` s, else an AssertionError naming ``what``."""
    assert wait_until(cond, timeout, 0.05), f"timed out waiting for {what}"
