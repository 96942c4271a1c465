"""kvwire's public surface: what ``import kvwire`` exports, what it loads, and the deprecated paths that still work.

``__all__`` is pinned: adding or removing an engine-facing name is a decision, made here on purpose. Every
name the package exported before it was trimmed resolves, from ``kvwire`` and from test code's old homes
(``kvwire.codec.fixtures``, ``kvwire.codec.frames.FrameDecoder``), to the very object in its new module,
with a ``DeprecationWarning`` that names that module.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import kvwire

ROOT = Path(__file__).resolve().parents[1]

ENGINE_SURFACE = {
    "Receiver", "connect", "Session", "IncomingTransfer", "OutgoingTransfer", "State",
    "RequestSpec", "ModelLayout", "load_layout", "plan_segments",
    "KvwireError", "TransferFailed", "TransferTimedOut", "TransferCancelled", "LayoutMismatch",
}

# every name kvwire exported before the trim (issue 13) and not in ENGINE_SURFACE -> its module now
MOVED = {
    "AuthenticationError": "kvwire.errors", "ConnectError": "kvwire.errors", "ConnectTimeout": "kvwire.errors",
    "InsecureReceiverWarning": "kvwire.errors", "InvalidBuffer": "kvwire.errors", "KvwireWarning": "kvwire.errors",
    "LayoutError": "kvwire.errors", "ProbeRefused": "kvwire.errors", "ProtocolError": "kvwire.errors",
    "ReshardRequired": "kvwire.errors", "ReshardUnsupported": "kvwire.errors",
    "StatePositionMismatch": "kvwire.errors", "TransferError": "kvwire.errors",
    "Limits": "kvwire.codec.frames", "Segment": "kvwire.codec.layout", "check_compatible": "kvwire.codec.compat",
    "PRESETS": "kvwire.codec.presets", "load_preset": "kvwire.codec.presets",
    "ReshardPlan": "kvwire.codec.reshard", "check_reshardable": "kvwire.codec.reshard",
    "plan_reshard": "kvwire.codec.reshard",
    "LinkControl": "kvwire.congestion.control", "ControllerConfig": "kvwire.congestion.controller",
    "LinkState": "kvwire.congestion.estimator", "LaneGroup": "kvwire.congestion.group",
    "Metrics": "kvwire.metrics", "ProbeResult": "kvwire.probe",
    "ReshardIncoming": "kvwire.reshard", "ReshardOutgoing": "kvwire.reshard", "ReshardReceiver": "kvwire.reshard",
    "ReshardSender": "kvwire.reshard",
}

# errors that were never ``kvwire.<name>`` and live only in ``kvwire.errors`` (added after the trim): like
# ProtocolError and AuthenticationError, they are not what an engine catches from a transfer (an early-window
# breach ends the peer's session inside the receiver; its transfers fail with TransferFailed), so they stay
# out of ``__all__``. Listing a new error here, in MOVED or in ENGINE_SURFACE is the decision.
ERRORS_ONLY = {"EarlyWindowExceeded", "PoolExhausted"}

OPTIONAL = ("torch", "transformers", "starlette", "uvicorn", "prometheus_client", "httpx", "openai", "cupy")


def test_all_is_the_engine_surface() -> None:
    assert set(kvwire.__all__) == ENGINE_SURFACE
    assert len(kvwire.__all__) == len(ENGINE_SURFACE)  # no duplicates
    for name in kvwire.__all__:
        assert getattr(kvwire, name) is not None


def test_every_error_has_a_decided_home() -> None:
    """Each exception and warning class in ``kvwire.errors`` is on the engine surface, a pre-trim name kept
    as a deprecated ``kvwire.<name>``, or pinned as ``kvwire.errors``-only: a new one fails here until placed."""
    import inspect

    from kvwire import errors

    classes = {n for n, c in vars(errors).items()
               if inspect.isclass(c) and issubclass(c, (Exception, Warning)) and c.__module__ == errors.__name__}
    placed = (ENGINE_SURFACE | {n for n, m in MOVED.items() if m == "kvwire.errors"} | ERRORS_ONLY) & classes
    assert classes == placed, sorted(classes - placed)
    assert not ERRORS_ONLY & (ENGINE_SURFACE | set(MOVED))
    for name in ERRORS_ONLY:
        with pytest.raises(AttributeError):
            getattr(kvwire, name)


def test_star_import_gives_exactly_the_surface() -> None:
    scope: dict[str, object] = {}
    exec("from kvwire import *", scope)
    assert set(scope) - {"__builtins__"} == ENGINE_SURFACE


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_moved_name_resolves_to_its_new_home_with_a_warning(name: str) -> None:
    module = MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"from {module} import {name}"):
        old = getattr(kvwire, name)
    assert old is getattr(importlib.import_module(module), name)


def test_the_moved_table_is_the_one_the_package_serves() -> None:
    assert kvwire._MOVED == MOVED
    assert not set(MOVED) & ENGINE_SURFACE


def test_kvwire_probe_still_calls_the_probe_with_a_warning() -> None:
    """``kvwire.probe`` is also a module name, so the function stays bound as a warning wrapper (not a lazy
    name): it must keep calling ``kvwire.probe.probe``, whatever imported the module first."""
    from kvwire.probe import probe

    assert kvwire.probe is not probe and kvwire.probe.__wrapped__ is probe  # type: ignore[attr-defined]
    with pytest.warns(DeprecationWarning, match="from kvwire.probe import probe"):
        with pytest.raises(TypeError):  # reaches the real function: its signature refuses no arguments
            kvwire.probe()


def test_an_unknown_name_is_an_attribute_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_name"):
            kvwire.no_such_name  # noqa: B018
        assert not hasattr(kvwire, "FrameDecoder")


def test_the_engine_surface_does_not_warn() -> None:
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from kvwire import *\nimport kvwire\n"
            "[getattr(kvwire, n) for n in kvwire.__all__]\n")
    _run(code)


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_kvwire_loads_no_optional_dependency_and_no_test_code() -> None:
    code = ("import json, sys\nimport kvwire\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    loaded = json.loads(_run(code))
    assert "kvwire" in loaded and "kvwire.tcp" in loaded  # negative control: the probe sees real imports
    heavy = [m for m in loaded if m.split(".")[0] in OPTIONAL]
    testing = [m for m in loaded if m == "kvwire.testing" or m.startswith("kvwire.testing.")]
    assert heavy == [] and testing == []


def test_the_check_sees_an_import_of_test_code() -> None:
    """Negative control for the test above: importing kvwire.testing does show up."""
    code = "import json, sys\nimport kvwire.testing.fixtures\nprint(json.dumps(sorted(sys.modules)))\n"
    assert "kvwire.testing.fixtures" in json.loads(_run(code))


def test_old_fixtures_module_is_the_new_one_with_a_warning() -> None:
    from kvwire.testing import fixtures

    sys.modules.pop("kvwire.codec.fixtures", None)
    with pytest.warns(DeprecationWarning, match="kvwire.testing.fixtures"):
        old = importlib.import_module("kvwire.codec.fixtures")
    for name in ("FIXTURES", "load_fixture", "default_request", "fixture_payload", "index_coded", "_rng"):
        assert getattr(old, name) is getattr(fixtures, name)


@pytest.mark.parametrize("name", ["FrameDecoder", "ControlFrame", "DataFrame", "Frame"])
def test_the_frame_decoder_moved_to_testing_with_a_warning(name: str) -> None:
    from kvwire.codec import frames
    from kvwire.testing import decoder

    with pytest.warns(DeprecationWarning, match=f"from kvwire.testing.decoder import {name}"):
        old = getattr(frames, name)
    assert old is getattr(decoder, name)


def test_the_wire_format_does_not_import_the_decoder() -> None:
    code = ("import json, sys\nimport kvwire.codec.frames\nprint(json.dumps(sorted(sys.modules)))\n")
    assert "kvwire.testing.decoder" not in json.loads(_run(code))


def test_check_compatible_moved_to_compat_with_a_warning() -> None:
    from kvwire.codec import compat, layout

    with pytest.warns(DeprecationWarning, match="from kvwire.codec.compat import check_compatible"):
        old = layout.check_compatible
    assert old is compat.check_compatible


def test_conv_rank_split_is_one_function_in_both_homes() -> None:
    from kvwire.codec import hf, layout

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.conv_rank_split is layout.conv_rank_split


# ---------------------------------------------------------------- kvwire.tcp: its face, and its inside made private

TCP_FACE = {
    "Channel", "ChunkRef", "ChunkStage", "GatedHTTPServer", "HandshakeGate", "IncomingTransfer", "LaneHook",
    "LaneInfo", "LayerOutcome", "OutgoingTransfer", "Outcome", "PeerClosed", "Receiver", "Session", "Ticket",
    "WarmUp", "client_handshake", "connect", "host_port", "listen", "recv_exact_into", "server_handshake",
    "server_hello", "LONG_PATH_RTT",
}  # (LONG_PATH_RTT: where a session opens every lane its controller may use at once, the warm-up's
#    threshold too; WarmUp: the type of Session(warm_up=...), the seam kvwire.connect hands kvwire.probe.warm_up
#    through; the probe is built on the transport, which no longer holds a registry of it: install_warm_up is gone)


def test_tcp_package_face_is_pinned() -> None:
    import kvwire.tcp

    assert set(kvwire.tcp.__all__) == TCP_FACE
    for name in TCP_FACE:
        assert getattr(kvwire.tcp, name) is not None
    assert kvwire.tcp.Session is kvwire.Session and kvwire.tcp.Receiver is kvwire.Receiver


@pytest.mark.parametrize("old", ["accept", "auth", "callbacks", "gate", "handle", "httpd", "incoming", "lanes",
                                 "outgoing", "receiver", "rxsession", "sender", "txlanes", "wire"])
def test_tcp_modules_made_private_still_import_with_a_warning(old: str) -> None:
    """In a fresh interpreter (the old name must not be cached): ``import kvwire.tcp.<old>`` warns, names the
    private module, and is that very module; ``from kvwire.tcp.<old> import X`` works too."""
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('error')\n"
        f"new = importlib.import_module('kvwire.tcp._{old}')\n"
        "try:\n"
        f"    importlib.import_module('kvwire.tcp.{old}')\n"
        "except DeprecationWarning as e:\n"
        f"    assert 'kvwire.tcp._{old}' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no warning')\n"
        "warnings.simplefilter('ignore')\n"
        f"import kvwire.tcp.{old} as old\n"
        "assert old is new, (old, new)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr


def test_unknown_tcp_module_is_still_an_import_error() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kvwire.tcp.no_such_module")
