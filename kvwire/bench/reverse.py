"""``-R``: the server sends, the client receives and verifies, as in iperf3.

Owns both ends of a reverse test. The client starts a one-off receiving bench server of its own (a kvwire
Receiver, the pattern check, per-layer verified times: the very code of ``kvwire-bench -s``) on the
address its control connection leaves from, and sends ``reverse {port, opts, model_config}`` over the
control channel it already authenticated. The server then runs the ordinary sending client
(``run_client``, with ``--adaptive``/``--polite``/``--probe`` as asked: the sending side runs them) against
that address with the client's options and the shared key, streams its
``start``/``interval``/``request`` events back as they happen (plus a heartbeat), and finally the run
document (``reverse_done {doc}``) or the reason it failed (``reverse_failed``). So the sending side
measures, the receiving side verifies every byte and times every layer, whichever host runs what.

Must not know: the output formats (the client's reporter prints what arrives) or the wire.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .ctlclient import ControlClient
from .errors import BenchError, PeerError, PeerGone, UsageError
from .options import Options, check

#: the client options a reverse test carries to the sending server
FORWARDED = ("lanes", "duration", "nbytes", "length", "interval", "congestion", "fq_rate", "hashing",
             "chunk_size", "model", "tokens", "tp", "requests", "concurrency", "prefill_ms", "seed",
             "timeout", "connect_timeout", "adaptive", "polite", "probe_seconds")
SILENCE = 15.0  # seconds without any message from the sending server before the client gives up
MAX_CONFIG = 1 << 20

Callback = Callable[[dict[str, Any]], None]


def _plain(v: Any) -> Any:
    """msgpack-safe copy (tuples become lists)."""
    return json.loads(json.dumps(v))


# ---------------------------------------------------------------- the receiving client


def reverse_request(o: Options) -> dict[str, Any]:
    """The ``reverse`` message's fields besides the port: options, and a config.json by value."""
    opts = {name: getattr(o, name) for name in FORWARDED}
    model_config = None
    if o.model is not None and os.path.isfile(o.model):
        try:
            with open(o.model, encoding="utf-8") as f:
                text = f.read(MAX_CONFIG + 1)
        except OSError as e:
            raise UsageError(f"--model {o.model!r}: {e}") from None
        if len(text) > MAX_CONFIG:
            raise UsageError(f"--model {o.model!r}: config larger than {MAX_CONFIG} bytes")
        model_config = text
    return {"opts": opts, "model_config": model_config}


def run_reverse(o: Options, ctl: ControlClient, receiver_port: int, on_start: Callback | None,
                on_interval: Callback | None, on_request: Callback | None) -> tuple[dict[str, Any], list[Any]]:
    """Ask the server to send to ``receiver_port`` (already listening); relay its events until the run
    document arrives. Returns ``(document, lane byte series)``; raises PeerError/PeerGone/UsageError."""
    ctl.ch.send("reverse", port=receiver_port, want_series=bool(o.plot), **reverse_request(o))
    while True:
        msg = ctl.next_message(SILENCE)
        if msg is None:
            raise PeerGone(f"{ctl.ch.peer} went silent or away during the reverse test: "
                           f"{ctl.error or f'no message for {SILENCE:.0f} s'}")
        op = msg["op"]
        if op == "hb":
            continue
        if op == "rstart" and on_start is not None:
            on_start(msg.get("info") or {})
        elif op == "rinterval" and on_interval is not None:
            on_interval(msg.get("rec") or {})
        elif op == "rrequest" and on_request is not None:
            on_request(msg.get("rec") or {})
        elif op == "reverse_done":
            doc = msg.get("doc")
            if not isinstance(doc, dict):
                raise PeerError(f"{ctl.ch.peer} sent a reverse result without a document")
            series = msg.get("series")
            return doc, series if isinstance(series, list) else []
        elif op == "reverse_failed":
            code = msg.get("exit_code")
            err = UsageError if code == UsageError.exit_code else PeerError if code == PeerError.exit_code \
                else BenchError
            raise err(f"the server could not send: {msg.get('reason', '?')}")
        elif op == "error":
            raise PeerError(f"{ctl.ch.peer} refused the reverse test: {msg.get('reason', '?')}")


def run_reverse_client(o: Options, on_start: Callback | None = None, on_interval: Callback | None = None,
                       on_request: Callback | None = None, log: Callable[[str], None] | None = None,
                       progress: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, Any], list[Any]]:
    """The whole client side of ``-R``: connect, start the local receiving server, run, tear down."""
    from .server import BenchServer, ServerConfig

    ctl = ControlClient.connect(o.host, o.port, o.key, None, o.connect_timeout)
    try:
        local_host = str(ctl.ch.sock.getsockname()[0])
        cfg = ServerConfig(bind=local_host, port=0, data_port=0, key=o.key, pool_bytes=o.pool_bytes,
                           verify_seed=o.verify_seed, one_off=True)
        try:
            rx = BenchServer(cfg, log=log or (lambda _: None))
        except OSError as e:
            raise BenchError(f"cannot listen on {local_host} for the reverse test: {e}") from None
        serving = threading.Thread(target=rx.serve, name="kvwire-bench-rserve", daemon=True)
        serving.start()
        try:
            def started(info: dict[str, Any]) -> None:
                missing = [name for name, asked, key in (("--adaptive", o.adaptive, "link_control"),
                                                         ("--probe", o.probe_seconds is not None, "probe"))
                           if asked and key not in info]
                if missing:  # an older server drops options it does not know
                    raise PeerError(f"the server ignored {' and '.join(missing)}: it runs an older kvwire-bench")
                if on_start is not None:
                    from .client import resolve_layout

                    layout, _ = resolve_layout(o)
                    on_start(dict(info, layout=layout, data_port=rx.data_address[1]))

            if progress is not None:
                progress(f"Setting up: {o.host} connects back to port {rx.data_address[1]} here, prepares its "
                         "payloads and sends (this host's buffers are faulted in meanwhile)")
            doc, series = run_reverse(o, ctl, rx.address[1], started, on_interval, on_request)
            return reverse_document(doc, o, rx.data_address[1]), series
        finally:
            rx.close()
            serving.join(5)
    finally:
        ctl.close()


def reverse_document(doc: dict[str, Any], o: Options, data_port: int) -> dict[str, Any]:
    """The sender's document as the receiving client reports it: ``reverse`` set, this host's CPU as
    ``host_*``, the client's own target in ``connecting_to`` and its model name (not a temp path)."""
    start = doc["start"]
    start["test_start"]["reverse"] = 1
    start["connecting_to"] = {"host": o.host, "port": o.port, "data_port": data_port}
    cpu = doc["end"]["cpu_utilization_percent"]
    for part in ("total", "user", "system"):
        cpu[f"host_{part}"], cpu[f"remote_{part}"] = cpu[f"remote_{part}"], cpu[f"host_{part}"]
    doc["kv"]["model"] = o.model or "raw"
    doc["kv"]["direction"] = "reverse"
    return doc


# ---------------------------------------------------------------- the sending server


def serve_reverse(send: Callable[..., None], alive: Callable[[], bool], peer_host: str, key: bytes,
                  msg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run the sending side of a reverse test against the client's receiver at ``peer_host``; report over
    ``send``. Returns this side's record: ``{"doc", "verified"}`` or ``{"error", "verified": False}``."""
    from .client import run_client
    from .document import build_document

    tmp: str | None = None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(1.0) and alive():
            send("hb")

    beater = threading.Thread(target=beat, name="kvwire-bench-rhb", daemon=True)
    beater.start()
    try:
        port, opts = msg.get("port"), msg.get("opts")
        if not isinstance(port, int) or not isinstance(opts, dict):
            raise UsageError("reverse needs an int port and an opts map")
        known = {f.name for f in fields(Options)}
        o = Options(mode="client", host=peer_host, port=port, key=key,
                    **{k: v for k, v in opts.items() if k in FORWARDED and k in known})
        config = msg.get("model_config")
        if isinstance(config, str):
            fd, tmp = tempfile.mkstemp(prefix="kvwire-bench-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(config)
            o.model = tmp
        check(o)
        log(f"Reverse test: sending to {peer_host} port {port}")

        def on_start(info: dict[str, Any]) -> None:
            layout = info["layout"]
            send("rstart", info=_plain({k: v for k, v in info.items() if k not in ("layout", "welcome")}
                                       | {"layout_name": layout.name}))

        result = run_client(o, on_start, lambda rec: send("rinterval", rec=_plain(rec)),
                            lambda rec: send("rrequest", rec=_plain(rec)))
        doc = _plain(build_document(result))
        if isinstance(config, str):
            doc["kv"]["model"] = "config.json (sent by the client)"
        series = _plain(result.series) if msg.get("want_series") else None
        send("reverse_done", doc=doc, series=series)
        verified = bool(doc["kv"]["verification"]["verified"])
        log(f"Reverse test to {peer_host}: {'verified' if verified else 'NOT verified'}, "
            f"{doc['kv']['payload_bytes']} bytes")
        return {"doc": doc, "verified": verified}
    except BenchError as e:
        send("reverse_failed", reason=str(e), exit_code=e.exit_code)
        log(f"Reverse test to {peer_host} failed: {e}")
        return {"error": str(e), "verified": False}
    except Exception as e:  # noqa: BLE001 - the client must hear why, whatever it was
        send("reverse_failed", reason=f"{type(e).__name__}: {e}", exit_code=BenchError.exit_code)
        log(f"Reverse test to {peer_host} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "verified": False}
    finally:
        stop.set()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


__all__ = ["reverse_document", "reverse_request", "run_reverse", "run_reverse_client", "serve_reverse"]
