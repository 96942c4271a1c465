"""Every code block of README.md and docs/*.md runs as written (CPU, loopback).

The rules, applied to every fenced block of those files (new files and new blocks are picked up by
themselves):

* A ```` ```python ```` block runs alone, as written, in a fresh interpreter (working directory: the
  repository root, this tree's ``kvwire`` first on the path) and must exit 0 within ``TIMEOUT`` seconds.
  It may not lean on an earlier block: each block is what a reader copies.
* A ```` ```bash ```` / ``sh`` / ``shell`` block runs the same way under ``bash -euo pipefail``.
* A block that cannot run here says why on the line right before its fence::

      <!-- not-run: needs a CUDA GPU and vLLM -->

  It is reported as a skip with that reason; a marker without a reason, or not followed by a fence,
  fails. The quick start's install-and-run block is marked so: its commands install packages, and
  they are proven by a run in a fresh virtual environment (the closing note of issue 14), not here.
* A block that would change the environment (``pip install``, ``apt-get install``, ``scripts/test``,
  which installs) is never run by this test: unmarked, it fails without running.
* Any other language tag (``text``, ``json``...) is not code and is not run. A fence without a tag fails:
  say ``text`` for schemas and diagrams, so that a command block cannot hide untagged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 240
RUN = {"python": [sys.executable, "-c"], "bash": ["bash", "-euo", "pipefail", "-c"]}
ALIASES = {"py": "python", "python3": "python", "sh": "bash", "shell": "bash"}
MARKER = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
INSTALLS = re.compile(r"\bpip3?\s+install\b|-m\s+pip\s+install\b|\bapt(-get)?\s+install\b|\bscripts/test\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason, "" for a marker without one

    @property
    def name(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where}:{self.line}"


def blocks_of(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``path``, and the problems with its fences and markers."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    problems: list[str] = []
    marker: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            if marker is not None:
                problems.append(f"{path.name}:{marker[0]}: not-run marker not followed by a fence")
            marker = (i + 1, m.group(1).strip())
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f is None:
            if lines[i].strip() and marker is not None:
                problems.append(f"{path.name}:{marker[0]}: not-run marker not followed by a fence")
                marker = None
            i += 1
            continue
        ticks, lang = f.group(1), f.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        if end is None:
            problems.append(f"{path.name}:{i + 1}: fence never closed")
            break
        if not lang:
            problems.append(f"{path.name}:{i + 1}: a fence without a language (use text for non-code)")
        reason = marker[1] if marker is not None else None
        if reason == "":
            problems.append(f"{path.name}:{marker[0] if marker else i}: not-run marker without a reason")
        out.append(Block(path, i + 1, ALIASES.get(lang, lang), "\n".join(lines[i + 1 : end]) + "\n", reason))
        marker = None
        i = end + 1
    if marker is not None:
        problems.append(f"{path.name}:{marker[0]}: not-run marker not followed by a fence")
    return out, problems


ALL = [b for p in DOCS for b in blocks_of(p)[0]]
CODE = [b for b in ALL if b.lang in RUN]


def test_fences_and_markers_are_well_formed() -> None:
    problems = [x for p in DOCS for x in blocks_of(p)[1]]
    assert not problems, "\n".join(problems)
    assert len(CODE) >= 5  # the README's python blocks at least: the collection itself works


@pytest.mark.parametrize("block", CODE, ids=lambda b: b.name)
def test_block_runs_as_written(block: Block) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.name} not run: {block.not_run}")
    if INSTALLS.search(block.code):
        pytest.fail(f"{block.name} installs packages: mark it <!-- not-run: REASON --> (it is not run here)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    try:
        r = subprocess.run([*RUN[block.lang], block.code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.name} ({block.lang}) did not finish in {TIMEOUT}s:\n{e.stdout!r}\n{e.stderr!r}")
    assert r.returncode == 0, f"{block.name} ({block.lang}) exited {r.returncode}:\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-3000:]}"


def test_the_rules_catch_what_they_promise(tmp_path: Path) -> None:
    """Negative controls: an untagged fence, a marker without a reason and a dangling marker are reported;
    a marked block carries its reason."""
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```\nkvwire-bench -c HOST\n```\n\n<!-- not-run: -->\n```python\nx = 1\n```\n\n"
                   "<!-- not-run: needs a GPU -->\n```python\nimport cupy\n```\n\n<!-- not-run: dangling -->\nprose\n")
    blocks, problems = blocks_of(doc)
    assert [b.lang for b in blocks] == ["", "python", "python"]
    assert [b.not_run for b in blocks] == [None, "", "needs a GPU"]
    assert len(problems) == 3 and "without a language" in problems[0] and "without a reason" in problems[1] \
        and "not followed" in problems[2]
    with pytest.raises(pytest.fail.Exception, match="installs packages"):  # refused before anything runs
        test_block_runs_as_written(Block(doc, 1, "bash", "pip install -e . && false\n", None))
