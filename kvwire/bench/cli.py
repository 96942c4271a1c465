"""Entry point of ``kvwire-bench`` / ``python -m kvwire.bench``: parse, dispatch, map errors to exit codes.

Owns: running the server until interrupted, running a client (or a loopback pair) and turning its
document into output, a plot and an exit status (0 only when every byte of every request was verified at
the receiver). Must not know: the wire, the control protocol or measurement details.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import termination
from .document import build_document, build_server_document
from .errors import EXIT_FAILED, EXIT_OK, BenchError, UsageError
from .loopback import LoopbackServer
from .options import (
    SHORT_V_DEPRECATED,
    Options,
    build_parser,
    options_from_args,
    server_ssl_context,
    version_text,
)
from .report import Reporter
from .sending import run_sender


def _log(text: str) -> None:
    print(text, flush=True)


def _log_err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _print_server_document(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(build_server_document(record), indent=2) + "\n")
    sys.stdout.flush()


def run_server(o: Options) -> int:
    from .server import BenchServer, ServerConfig

    # -J: one JSON document per test on stdout (iperf3 -s -J), the log lines go to stderr
    log = _log_err if o.json else _log
    cfg = ServerConfig(bind=o.bind, port=o.port, data_port=o.effective_data_port(), key=o.key,
                       ssl_context=server_ssl_context(o), pool_bytes=o.pool_bytes, verify_seed=o.verify_seed,
                       one_off=o.one_off, on_test=_print_server_document if o.json else None,
                       metrics_port=o.metrics_port)
    try:
        server = BenchServer(cfg, log=log)
    except OSError as e:
        raise BenchError(f"cannot listen on {o.bind}:{o.port} / data port {cfg.data_port}: {e}") from None
    host, port = server.address
    if server.insecure:
        _log_err(server.insecure_warning())
    log("-" * 60)
    log(f"Server listening on {host} port {port} (kvwire data port {server.data_address[1]})")
    if server.metrics_server is not None:
        m_host, m_port = server.metrics_server.address
        log(f"Metrics at http://{f'[{m_host}]' if ':' in m_host else m_host}:{m_port}/metrics")
    log("-" * 60)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        return server.serve()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        server.close()


def run_client_cli(o: Options, link: dict[str, Any] | None = None,
                   decorate: Callable[[dict[str, Any]], None] | None = None) -> int:
    """One test from this host (sending, or receiving with ``-R``); ``link`` describes an emulated link,
    ``decorate`` adds to the document before it is printed."""
    reporter = Reporter(o, link=link)
    if o.plot:
        from .plot import check_matplotlib

        check_matplotlib()
    bad: BenchError | None = None  # the server sent what the client cannot take, after the test started
    try:
        if o.reverse:
            from .reverse import run_reverse_client

            doc, series = run_reverse_client(o, reporter.start, reporter.interval, reporter.request,
                                             log=_log_err if o.verbose else None, progress=reporter.line)
        else:
            result = run_sender(o, reporter.start, reporter.interval, reporter.request, progress=reporter.line)
            doc, series, bad = build_document(result), result.series, result.bad_message
    except BenchError as e:
        reporter.error(str(e))
        return e.exit_code
    if link is not None:
        doc["start"]["emulated_link"] = link
    if decorate is not None:
        decorate(doc)
    reporter.finish(doc)
    rc = EXIT_OK if doc["kv"]["verification"]["verified"] else EXIT_FAILED
    if o.plot:
        from .plot import write_plot

        write_plot(o.plot, doc, series)
        if not (o.json or o.json_stream):
            print(f"Plot written to {o.plot}", flush=True)
    if bad is not None:  # what was measured is printed (its session_error says the same); the exit says why
        _log_err(f"kvwire-bench: error - {bad}")
        rc = bad.exit_code
    return rc


def run_loopback(o: Options) -> int:
    if not (o.json or o.json_stream):
        _log("Setting up: starting the loopback server (a child process)")
    with LoopbackServer(o) as server:
        o.host, o.port = "127.0.0.1", server.port
        return run_client_cli(o)


def run_emulate(o: Options) -> int:
    from .emulate import emulated, link_info

    with emulated(o) as (link, server):
        o.host, o.port = link.server_addr, server.port
        info = link_info(link)

        def add_stats(doc: dict[str, Any]) -> None:
            try:
                doc["kv"]["emulated_link_stats"] = link.stats()
            except Exception as e:  # noqa: BLE001 - the counters are a bonus, the run stands
                doc["kv"]["emulated_link_stats"] = {"error": f"{type(e).__name__}: {e}"}

        with link.inside("client"):
            return run_client_cli(o, link=info, decorate=add_stats)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["-v"]:  # iperf3 -v: the version
        print(version_text(), flush=True)
        return EXIT_OK
    args = parser.parse_args(argv)
    if args.short_v:
        _log_err(SHORT_V_DEPRECATED)
    try:
        o = options_from_args(args)
    except UsageError as e:
        parser.error(str(e))
    if o.mode != "server":  # (the server stops on SIGTERM by its own handler)
        termination.install()  # SIGTERM/SIGHUP unwind like Ctrl-C: child server, emulated link torn down
    try:
        if o.mode == "server":
            return run_server(o)
        if o.decode_tp is not None:
            from .reshard import run_reshard_bench

            return run_reshard_bench(o, _log)
        if o.mode == "loopback":
            return run_loopback(o)
        if o.mode == "emulate":
            return run_emulate(o)
        return run_client_cli(o)
    except UsageError as e:
        sys.stderr.write(f"kvwire-bench: {e}\n")
        return e.exit_code
    except BenchError as e:
        sys.stderr.write(f"kvwire-bench: error - {e}\n")
        return e.exit_code
    except termination.Terminated as e:
        sys.stderr.write(f"kvwire-bench: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("kvwire-bench: interrupted\n")
        return 130
