"""The C WAN emulator (``wanemu.c``), compiled on demand and cached; and the choice of emulator backend.

Owns: building ``wanemu.c`` (shipped beside this module with the headers it includes, ``SOURCES``) with
the system C compiler into a cache directory (``$XDG_CACHE_HOME/kvwire`` or ``~/.cache/kvwire``), one
binary per hash of every source file and the flags, written under
a temporary name and renamed into place so concurrent builders never see a partial file; and turning
``"auto"|"c"|"python"`` (or ``$KVWIRE_WAN_EMULATOR``) into the command that runs the emulator. The C
program is the same emulator as ``emulator.py`` (the reference and the fallback): same config JSON,
control lines, ready line and stats keys. Must not know: namespaces, netlink, the link model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import KvwireError

SOURCE = Path(__file__).with_name("wanemu.c")
#: every file the build reads: ``wanemu.c`` and the headers it includes (one translation unit); all are hashed
SOURCES = (SOURCE, SOURCE.with_name("wanemu_json.h"), SOURCE.with_name("wanemu_link.h"))
BACKEND_ENV = "KVWIRE_WAN_EMULATOR"
BACKENDS = ("auto", "c", "python")
#: the backend when neither the argument nor ``$KVWIRE_WAN_EMULATOR`` names one
DEFAULT = "auto"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-pthread")


class EmulatorBuildError(KvwireError):
    """The C emulator was asked for but could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvwire"


def compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on PATH; ``None`` when there is none."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def binary_path() -> Path:
    """Where the binary for the current sources (``SOURCES``) and ``CFLAGS`` lives (whether or not it was
    built yet)."""
    h = hashlib.sha256()
    for path in SOURCES:  # each named and length-prefixed: moving text from one file to another changes it too
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode() + data)
    h.update(" ".join(CFLAGS).encode())
    return cache_dir() / f"wanemu-{h.hexdigest()[:16]}"


def build() -> Path | None:
    """The compiled emulator: built now unless the cache has it. ``None`` when no C compiler is
    installed; ``EmulatorBuildError`` when one is but the build fails (or the cache is unwritable)."""
    target = binary_path()
    if os.access(target, os.X_OK):
        return target
    cc = compiler()
    if cc is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise EmulatorBuildError(f"cannot write the emulator cache {target.parent}: {e}") from e
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise EmulatorBuildError(f"{cc} failed on {SOURCE.name} ({r.returncode}): {r.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: another builder's identical binary may be replaced, never torn
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve(choice: str | None) -> str:
    """``choice`` (or ``$KVWIRE_WAN_EMULATOR``, or ``DEFAULT``) checked against ``BACKENDS``."""
    value = choice if choice is not None else os.environ.get(BACKEND_ENV) or DEFAULT
    if value not in BACKENDS:
        raise ValueError(f"emulator {value!r}: one of {', '.join(BACKENDS)} (argument or ${BACKEND_ENV})")
    return value


def emulator_command(choice: str | None) -> tuple[list[str], str]:
    """``(argv prefix, backend)``: the config JSON is appended to the argv. ``"auto"`` is C when it
    builds, else Python; ``"c"`` raises ``EmulatorBuildError`` when it cannot be built."""
    backend = resolve(choice)
    if backend != "python":
        try:
            binary = build()
        except EmulatorBuildError as e:
            if backend == "c":
                raise
            sys.stderr.write(f"kvwire: {e}; using the Python WAN emulator\n")
            binary = None
        if binary is not None:
            return [str(binary)], "c"
        if backend == "c":
            raise EmulatorBuildError("the C emulator needs a C compiler (cc, gcc or clang; or $CC)")
    return [sys.executable, "-m", "kvwire.testing.emulator"], "python"
