"""Entry point of ``kvwire-bench`` / ``python -m kvwire.bench``: parse, dispatch, map errors to exit codes.

Owns: running the server until interrupted, running a client (or a loopback pair) and turning its
document into output, a plot and an exit status (0 only when every byte of every request was verified at
the receiver). Must not know: the wire, the control protocol or measurement details.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from .client import run_client
from .document import build_document
from .errors import EXIT_FAILED, EXIT_OK, BenchError, UsageError
from .loopback import LoopbackServer
from .options import Options, build_parser, options_from_args, server_ssl_context
from .report import Reporter


def _log(text: str) -> None:
    print(text, flush=True)


def run_server(o: Options) -> int:
    from .server import BenchServer, ServerConfig

    cfg = ServerConfig(bind=o.bind, port=o.port, data_port=o.effective_data_port(), key=o.key,
                       ssl_context=server_ssl_context(o), pool_bytes=o.pool_bytes, verify_seed=o.verify_seed,
                       one_off=o.one_off)
    try:
        server = BenchServer(cfg, log=_log)
    except OSError as e:
        raise BenchError(f"cannot listen on {o.bind}:{o.port} / data port {cfg.data_port}: {e}") from None
    host, port = server.address
    _log("-" * 60)
    _log(f"Server listening on {host} port {port} (kvwire data port {server.data_address[1]})")
    _log("-" * 60)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        return server.serve()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        server.close()


def run_client_cli(o: Options) -> int:
    reporter = Reporter(o)
    if o.plot:
        from .plot import check_matplotlib

        check_matplotlib()
    try:
        result = run_client(o, reporter.start, reporter.interval, reporter.request)
    except BenchError as e:
        reporter.error(str(e))
        return e.exit_code
    doc = build_document(result)
    reporter.finish(doc)
    rc = EXIT_OK if doc["kv"]["verification"]["verified"] else EXIT_FAILED
    if o.plot:
        from .plot import write_plot

        write_plot(o.plot, doc, result.series)
        if not (o.json or o.json_stream):
            print(f"Plot written to {o.plot}", flush=True)
    return rc


def run_loopback(o: Options) -> int:
    with LoopbackServer(o) as server:
        o.host, o.port = "127.0.0.1", server.port
        return run_client_cli(o)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        o = options_from_args(args)
    except UsageError as e:
        parser.error(str(e))
    try:
        if o.mode == "server":
            return run_server(o)
        if o.mode == "loopback":
            return run_loopback(o)
        return run_client_cli(o)
    except UsageError as e:
        sys.stderr.write(f"kvwire-bench: {e}\n")
        return e.exit_code
    except BenchError as e:
        sys.stderr.write(f"kvwire-bench: error - {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("kvwire-bench: interrupted\n")
        return 130
