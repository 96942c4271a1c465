"""Named model presets: the cache-relevant fields of public ``config.json`` files, shipped as package data.

Owns: the preset names, reading ``codec/presets/*.json`` through importlib.resources, and
``load_layout`` (a preset name or a path to a ``config.json``). Must not know: sockets, threads,
torch, or how a config becomes a layout (``hf.py`` does that).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LayoutError
from .hf import layout_from_hf_config, read_config
from .layout import ModelLayout

PRESETS: list[str] = [
    "kimi-linear-48b-a3b",
    "qwen3-next-80b-a3b",
    "qwen3.5-397b-a17b",
    "qwen3.5-35b-a3b",
    "minimax-m1",
    "minimax-m2",
    "jamba-1.5-mini",
    "nemotron-h-8b",
    "falcon-h1-7b",
    "mimo-v2-flash",
    "ring-mini-linear-2.0",
    "mamba2-2.7b",
    "llama-3-70b",
    "deepseek-v3",
]


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's config dict."""
    if name not in PRESETS:
        raise LayoutError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    text = resources.files("kvwire.codec").joinpath("presets", f"{name}.json").read_text(encoding="utf-8")
    config = json.loads(text)
    if not isinstance(config, dict):  # pragma: no cover - the shipped files are objects
        raise LayoutError(f"preset {name!r} is not a JSON object")
    return config


def load_preset(name: str, **kw: Any) -> ModelLayout:
    """The preset's layout; keywords go to ``layout_from_hf_config`` (``name`` defaults to the preset's)."""
    kw.setdefault("name", name)
    return layout_from_hf_config(preset_config(name), **kw)


def load_layout(name_or_path: str | Path, **kw: Any) -> ModelLayout:
    """A preset by name, else the ``config.json`` at that path (a directory means its ``config.json``).
    ``TypeError`` for anything but a ``str`` or ``os.PathLike``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_layout takes a preset name or a path (str or os.PathLike), "
                        f"not {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return load_preset(name_or_path, **kw)
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(PRESETS)
        raise LayoutError(f"{str(name_or_path)!r} is neither a preset ({known}) nor a file")
    config = read_config(path)
    if path.is_dir():
        path = path / "config.json"
    kw.setdefault("name", path.parent.name if path.name == "config.json" else path.stem)
    return layout_from_hf_config(config, **kw)
