"""``-R``: the server sends, the client receives and verifies, as in iperf3, on the client's control connection.

Owns both ends of a reverse test, each made of the same two directions a plain test uses with the roles
swapped. The client (it dialled the control connection) starts the receiving side (``receiving``: a kvwire
Receiver, the pattern check, per-layer verified times) on the address its control connection leaves from
and sends ``reverse {data_port, opts, model_config}``; the server then runs the ordinary sending side
(``client.run_sender`` with a ``Requester`` over the same connection, ``--adaptive``/``--polite``/``--probe``
as asked: the sending side runs them) against that port with the client's options and the shared key. The
receiving side answers its requests (``prepare``, ``start``, ``end``, ``ping``) as it answers a sending
client; the server streams its ``rstart``/``rinterval``/``rrequest`` events beside them, and finally the run
document (``reverse_done {doc}``) or the reason it failed (``reverse_failed``). So the sending side
measures, the receiving side verifies every byte and times every layer, whichever host dialled.

Must not know: the output formats (the client's reporter prints what arrives) or the wire.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..codec.hf import MAX_CONFIG_BYTES
from ..codec.presets import PRESETS
from ..sockopts import allowed_congestion_algorithms
from .control import BenchChannel, client_connect
from .document import build_document
from .errors import BadMessage, BenchError, PeerError, PeerGone, UsageError
from .messages import read_interval, read_reason, read_request, read_reverse_done, read_rstart
from .options import Options, check
from .pool import BufferPool
from .receiving import ReceiverConfig, ReceivingSide
from .requester import Requester
from .sending import resolve_layout, run_sender

#: the client options a reverse test carries to the sending server
FORWARDED = ("lanes", "duration", "nbytes", "length", "interval", "congestion", "fq_rate", "hashing",
             "chunk_size", "model", "tokens", "tp", "requests", "concurrency", "prefill_ms", "seed",
             "timeout", "connect_timeout", "adaptive", "polite", "probe_seconds", "warm")
MAX_CONFIG = MAX_CONFIG_BYTES
#: the sending server's bounds on what a client may ask of it (the server has one test slot; a keyless one
#: takes anyone's): no request starts after MAX_SECONDS of a test, whatever -t/-n/--requests ask, and these
#: are refused: -t over MAX_SECONDS, --requests over MAX_REQUESTS, --timeout over MAX_TIMEOUT,
#: --connect-timeout over MAX_CONNECT_TIMEOUT (seconds)
MAX_SECONDS = 3600.0
MAX_REQUESTS = 100_000
MAX_TIMEOUT = 600.0
MAX_CONNECT_TIMEOUT = 60.0
#: seconds the sending server waits for the client's ``bye`` once it has sent the document
BYE_GRACE = 5.0
#: seconds a ``-R`` client allows beyond the test and its last transfer (buffers faulted in, payloads filled,
#: the document built and sent)
RELAY_GRACE = 600.0

Callback = Callable[[dict[str, Any]], None]


def _plain(v: Any) -> Any:
    """msgpack-safe copy (tuples become lists)."""
    return json.loads(json.dumps(v))


# ---------------------------------------------------------------- the receiving client


def reverse_request(o: Options) -> dict[str, Any]:
    """The ``reverse`` message's fields besides the port: options, and a config.json by value."""
    opts = {name: getattr(o, name) for name in FORWARDED}
    model_config = None
    if o.model is not None and o.model not in PRESETS and o.model != "raw":
        # the server takes a preset name or the config itself, never a path on its side
        path = os.path.join(o.model, "config.json") if os.path.isdir(o.model) else o.model
        if not os.path.isfile(path):
            raise UsageError(f"--model {o.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_CONFIG + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--model {o.model!r}: {e}") from None
        if len(text) > MAX_CONFIG:
            raise UsageError(f"--model {o.model!r}: config larger than {MAX_CONFIG} bytes")
        model_config = text
    return {"opts": opts, "model_config": model_config}


def run_reverse_client(o: Options, on_start: Callback | None = None, on_interval: Callback | None = None,
                       on_request: Callback | None = None, log: Callable[[str], None] | None = None,
                       progress: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, Any], list[Any]]:
    """The whole client side of ``-R``: connect, start the receiving side here, ask the server to send to
    it, answer its requests and relay its events until the run document arrives; tear down. Returns
    ``(document, lane byte series)``; raises PeerError/PeerGone/UsageError/BenchError."""
    ch, welcome = client_connect(o.host, o.port, o.key, None, o.connect_timeout)
    try:
        local_host = str(ch.sock.getsockname()[0])
        cfg = ReceiverConfig(bind=local_host, data_port=0, key=o.key, pool_bytes=o.pool_bytes,
                             verify_seed=o.verify_seed)
        try:
            side = ReceivingSide(cfg, log or (lambda _: None))
        except OSError as e:
            raise BenchError(f"cannot listen on {local_host} for the reverse test: {e}") from None
        test, _ = side.open_test(str(welcome.get("run", "")), ch, ch.peer)
        assert test is not None  # a side of its own: nothing else runs there
        try:
            if progress is not None:
                progress(f"Setting up: {o.host} connects back to port {side.data_address[1]} here, prepares its "
                         "payloads and sends (this host's buffers are faulted in meanwhile)")
            ch.tell("reverse", data_port=side.data_address[1], want_series=bool(o.plot), **reverse_request(o))
            doc, series = _relay(o, ch, side, test, on_start, on_interval, on_request)
            return reverse_document(doc, o, side.data_address[1]), series
        finally:
            side.end_test(test)
            side.close()
    finally:
        try:
            ch.tell("bye")
        except OSError:
            pass
        ch.close()


def _relay(o: Options, ch: BenchChannel, side: ReceivingSide, test: Any, on_start: Callback | None,
           on_interval: Callback | None, on_request: Callback | None) -> tuple[dict[str, Any], list[Any]]:
    """Answer the sending server's requests (``side.serve``) and hand its events to the callbacks until its
    document or its failure arrives. Each event is read with types first (``messages``): one that is not
    what it must be is a BadMessage naming the field, as is a message of no kind the test has; the whole test
    ends within ``relay_deadline``, however busy the server keeps the channel."""
    deadline = time.monotonic() + relay_deadline(o)
    while True:
        try:
            msg = side.serve(test, deadline)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise PeerGone(f"{ch.peer} did not finish the reverse test within {relay_deadline(o):g} s") \
                    from None
            raise PeerGone(f"{ch.peer} went silent during the reverse test") from None
        if msg is None:
            raise PeerGone(f"{ch.peer} ended the reverse test without a result")
        op = msg["op"]
        if op == "rstart":
            info = read_rstart(msg)
            missing = [name for name, asked, key in (("--adaptive", o.adaptive, "link_control"),
                                                     ("--probe", o.probe_seconds is not None, "probe"),
                                                     ("--warm", o.warm, "probe"))
                       if asked and key not in info]
            if missing:  # an older server drops options it does not know
                raise PeerError(f"the server ignored {' and '.join(missing)}: it runs an older kvwire-bench")
            if on_start is not None:
                layout, _ = resolve_layout(o)
                on_start(dict(info, layout=layout, data_port=side.data_address[1]))
        elif op == "rinterval":
            rec = read_interval(msg)
            if on_interval is not None:
                on_interval(rec)
        elif op == "rrequest":
            rec = read_request(msg)
            if on_request is not None:
                on_request(rec)
        elif op == "reverse_done":
            return read_reverse_done(msg)
        elif op == "reverse_failed":
            reason, code = read_reason(msg), msg.get("exit_code")
            err = UsageError if code == UsageError.exit_code else PeerError if code == PeerError.exit_code \
                else BenchError
            raise err(f"the server could not send: {reason}")
        elif op == "error":
            raise PeerError(f"{ch.peer} refused the reverse test: {read_reason(msg)}")
        else:  # before, ignored: a server sending such messages within each peer timeout kept the client forever
            raise BadMessage(f"server sent a bad reverse test message: op {str(op)[:40]!r} is none of its kinds")


def relay_deadline(o: Options) -> float:
    """Seconds a ``-R`` client waits for the server's document: the longest test the sending side may run
    (``-t``, else ``MAX_SECONDS``), its last transfer's ``--timeout``, and ``RELAY_GRACE`` for set-up and the
    document."""
    return min(o.duration or MAX_SECONDS, MAX_SECONDS) + min(o.timeout, MAX_TIMEOUT) + RELAY_GRACE


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


def bound_request(o: Options, model_config: Any) -> None:
    """What a sending server refuses of a client's ``reverse`` options (UsageError), before it resolves
    anything: a ``model`` that is not a preset name (a path would be opened on the server: a FIFO blocked the
    handler, /dev/zero filled its memory, error texts told which files exist; a client sends a config.json
    by value instead), a ``model_config`` over MAX_CONFIG, amounts and deadlines over the MAX_* bounds, and a
    ``-C`` the kernel does not allow unprivileged processes (a root server would load any ``tcp_<name>``
    module the client names)."""
    if model_config is not None and (not isinstance(model_config, str) or len(model_config) > MAX_CONFIG):
        raise UsageError(f"model_config must be a config.json of at most {MAX_CONFIG} bytes")
    if o.model is not None and (not isinstance(o.model, str) or (o.model not in PRESETS and o.model != "raw")):
        raise UsageError(f"the server takes --model as a preset name ({', '.join(PRESETS)}) or a config.json the "
                         "client sends, not a path on the server")
    for name, value, top in (("-t", o.duration, MAX_SECONDS), ("--timeout", o.timeout, MAX_TIMEOUT),
                             ("--connect-timeout", o.connect_timeout, MAX_CONNECT_TIMEOUT),
                             ("--requests", o.requests, MAX_REQUESTS), ("-n", o.nbytes, None),
                             ("--prefill-ms-per-layer", o.prefill_ms, None), ("-i", o.interval, None)):
        if value is None and name in ("-t", "--requests", "-n"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UsageError(f"{name} must be a number, got {value!r}")
        if top is not None and value > top:
            raise UsageError(f"{name} {value:g} is over this server's bound of {top:g} for a reverse test")
    if o.timeout <= 0 or o.connect_timeout <= 0:
        raise UsageError("--timeout and --connect-timeout must be positive")
    if o.congestion is not None and o.congestion != "":  # "": the kernel's default, as on the command line
        allowed = allowed_congestion_algorithms()
        if not isinstance(o.congestion, str) or o.congestion not in allowed:
            raise UsageError(f"-C {o.congestion!r}: this server sends only with an algorithm its kernel allows "
                             f"({', '.join(allowed) or 'none listed'}; net.ipv4.tcp_allowed_congestion_control)")


def serve_reverse(ch: BenchChannel, run: str, peer_host: str, key: bytes, msg: dict[str, Any],
                  log: Callable[[str], None], pool: BufferPool | None = None) -> dict[str, Any]:
    """Run the sending side of a reverse test over ``ch`` against the client's receiver at ``peer_host``.
    Returns this side's record: ``{"doc", "verified", "completed"}`` or ``{"error", "verified": False, ...}``;
    ``completed`` once the client said ``bye`` after the result. ``pool``: the server's buffer pool, which the
    payload buffers are taken from (a test whose buffers exceed it is refused before anything is
    allocated); the client's options are bounded first (``bound_request``)."""
    tmp: str | None = None
    requester: Requester | None = None
    try:
        port, opts = msg.get("data_port"), msg.get("opts")
        if not isinstance(port, int) or isinstance(port, bool) or not isinstance(opts, dict):
            raise UsageError("reverse needs an int data_port and an opts map")
        known = {f.name for f in fields(Options)}
        o = Options(mode="client", host=peer_host, port=port, key=key,
                    **{k: v for k, v in opts.items() if k in FORWARDED and k in known})
        config = msg.get("model_config")
        if config is not None:
            o.model = None  # the config stands for the model
        bound_request(o, config)
        if isinstance(config, str):
            fd, tmp = tempfile.mkstemp(prefix="kvwire-bench-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(config)
            o.model = tmp
        check(o)
        log(f"Reverse test: sending to {peer_host} port {port}")
        requester = Requester(ch, {"run": run, "data_port": port}, who="client")

        def on_start(info: dict[str, Any]) -> None:
            layout = info["layout"]
            _tell(ch, "rstart", info=_plain({k: v for k, v in info.items() if k not in ("layout", "welcome")}
                                            | {"layout_name": layout.name}))

        result = run_sender(o, on_start, lambda rec: _tell(ch, "rinterval", rec=_plain(rec)),
                            lambda rec: _tell(ch, "rrequest", rec=_plain(rec)), ctl=requester, pool=pool,
                            max_seconds=MAX_SECONDS)
        doc = _plain(build_document(result))
        if isinstance(config, str):
            doc["kv"]["model"] = "config.json (sent by the client)"
        series = _plain(result.series) if msg.get("want_series") else None
        ch.tell("reverse_done", doc=doc, series=series)
        verified = bool(doc["kv"]["verification"]["verified"])
        log(f"Reverse test to {peer_host}: {'verified' if verified else 'NOT verified'}, "
            f"{doc['kv']['payload_bytes']} bytes")
        return {"doc": doc, "verified": verified, "completed": _bye(requester)}
    except (BenchError, OSError) as e:
        reason = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
        code = e.exit_code if isinstance(e, BenchError) else BenchError.exit_code
        _tell(ch, "reverse_failed", reason=reason, exit_code=code)
        log(f"Reverse test to {peer_host} failed: {reason}")
        return {"error": reason, "verified": False, "completed": False}
    except Exception as e:  # noqa: BLE001 - the client must hear why, whatever it was
        _tell(ch, "reverse_failed", reason=f"{type(e).__name__}: {e}", exit_code=BenchError.exit_code)
        log(f"Reverse test to {peer_host} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "verified": False, "completed": False}
    finally:
        if requester is not None:
            requester.close(bye=False)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _bye(requester: Requester) -> bool:
    """Wait (a little) for the client's ``bye`` after the result: True when it came."""
    while (msg := requester.next_message(BYE_GRACE)) is not None:
        if msg["op"] == "bye":
            return True
    return False


def _tell(ch: BenchChannel, op: str, **fields: Any) -> None:
    try:
        ch.tell(op, **fields)
    except OSError:
        pass  # the client is gone: nobody to tell


__all__ = ["bound_request", "reverse_document", "reverse_request", "run_reverse_client", "serve_reverse"]
