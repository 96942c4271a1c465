"""The run's JSON document: iperf3's layout where the meaning is the same, plus a ``kv`` section.

Owns: turning a ``RunResult`` into ``{start, intervals, end, kv}`` (``end.sum_sent``/``sum_received`` with
bytes, seconds, bits_per_second, retransmits; ``end.cpu_utilization_percent``), the per-request layer
timeline on the client's clock, exposed-tail percentiles and the verification verdict; ``start.probe`` and
``kv.link_control`` when the run has them. Must not know:
sockets, sessions or text formatting.
"""

from __future__ import annotations

import platform
import time
from typing import Any

from .. import __version__
from ..codec import parity
from .sending import RequestRecord, RunResult

GB = 1e9


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _request_timeline(r: RunResult, rec: RequestRecord, layer_bytes: dict[int, int]) -> dict[str, Any]:
    server = rec.server or {}
    arrived: dict[int, float] = {}
    for item in server.get("layers") or []:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], float):
            arrived[int(item[0])] = item[1] - r.clock_offset  # onto the client's clock
    layers = []
    for layer in r.layout.layers:
        i = layer.index
        p = rec.produced.get(i)
        v = arrived.get(i)
        layers.append({
            "layer": i,
            "kinds": list(layer.kinds),
            "bytes": layer_bytes.get(i, 0),
            "produced_ms": None if p is None else (p - rec.t0) * 1e3,
            "verified_ms": None if v is None else (v - rec.t0) * 1e3,
        })
    tail = None
    if rec.produced and arrived:
        tail = (max(arrived.values()) - max(rec.produced.values())) * 1e3
    return {
        "request_id": rec.request_id,
        "start": rec.t0 - r.t_start,
        "bytes": rec.nbytes,
        "transport_state": rec.state,
        "transport_reason": rec.reason,
        "verified": rec.verified,
        "server_state": server.get("state"),
        "server_reason": server.get("reason", ""),
        "bad_blocks": server.get("bad_blocks"),
        "first_bad_offset": server.get("first_bad"),
        "transfer_ms": None if rec.done_at is None else (rec.done_at - rec.t0) * 1e3,
        "exposed_tail_ms": tail,
        "layers": layers,
    }


def _failure_text(t: dict[str, Any]) -> str:
    if t["transport_state"] != "done":
        return f"{t['request_id']}: transfer {t['transport_state']}: {t['transport_reason']}"
    if t["server_state"] is None:
        return f"{t['request_id']}: no verification result from the server"
    if t["server_state"] != "done":
        return f"{t['request_id']}: server saw {t['server_state']}: {t['server_reason']}"
    return (f"{t['request_id']}: {t['bad_blocks']} block(s) of 4 MiB differ from the expected pattern "
            f"(first bad byte at offset {t['first_bad_offset']})")


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "min": min(values) if values else None, "max": max(values) if values else None}


def _receiver_stream(lane: dict[str, Any] | None, seconds: float) -> dict[str, Any] | None:
    """iperf3's ``streams[].receiver`` from the receiving side's per-lane count: TCP payload bytes the
    lane's socket(s) received (``tcpi_bytes_received``: chunk headers and re-sent chunks included)."""
    if lane is None or not isinstance(lane.get("bytes"), int):
        return None
    n = lane["bytes"]
    return {"socket": lane["socket"], "start": 0.0, "end": seconds, "seconds": seconds, "bytes": n,
            "bits_per_second": n * 8 / seconds, "wire_bytes": n, "sockets": lane.get("sockets", 1),
            "sender": False}


def build_document(r: RunResult) -> dict[str, Any]:
    o = r.opts
    seconds = max(r.t_end - r.t_start, 1e-9)
    srv = r.server
    layer_bytes = r.plan.layer_bytes()
    timelines = [_request_timeline(r, rec, layer_bytes) for rec in r.requests]
    verified = [t for t in timelines if t["verified"]]
    payload_verified = sum(t["bytes"] for t in verified)
    last = srv.get("last_verified")
    rx_seconds = max((last - r.clock_offset - r.t_start) if isinstance(last, float) else seconds, 1e-9)
    sent_bytes = sum(lane["bytes"] for lane in r.lanes)
    retrans = sum(lane["retransmits"] for lane in r.lanes)
    wire = sum(lane["wire_bytes"] for lane in r.lanes) + r.control_wire_bytes
    tx_cpu = max(0.0, r.cpu_user + r.cpu_system - r.fill_cpu)
    rx_cpu = max(0.0, float(srv.get("cpu_user", 0.0)) + float(srv.get("cpu_system", 0.0))
                 - float(srv.get("verify_cpu", 0.0)))
    rx_user = float(srv.get("cpu_user", 0.0)) - float(srv.get("verify_cpu", 0.0))
    moved_gb = payload_verified / GB
    ok = bool(timelines) and len(verified) == len(timelines) and not r.error
    rx_lanes = {x.get("socket"): x for x in srv.get("lanes") or [] if isinstance(x, dict)}
    streams = [{"sender": {"socket": lane["socket"], "start": 0.0, "end": seconds, "seconds": seconds,
                           "bytes": lane["bytes"], "bits_per_second": lane["bytes"] * 8 / seconds,
                           "retransmits": lane["retransmits"], "max_snd_cwnd": lane["max_snd_cwnd"],
                           "max_rtt": lane["max_rtt"], "min_rtt": lane["min_rtt"],
                           "mean_rtt": lane["mean_rtt"],
                           "chunks": lane["chunks"], "wire_bytes": lane["wire_bytes"],
                           "max_pacing_rate": lane["max_pacing_rate"], "sender": True},
                "receiver": _receiver_stream(rx_lanes.get(lane["socket"]), rx_seconds)}
               for lane in r.lanes]
    now = time.time()
    doc: dict[str, Any] = {
        "start": {
            "connected": r.connected,
            "version": f"kvwire-bench {__version__}",
            "system_info": " ".join(platform.uname()),
            "timestamp": _timestamp(now),
            "connecting_to": {"host": o.host, "port": o.port, "data_port": r.data_port},
            "fq_rate": o.fq_rate or 0,
            "test_start": {"protocol": "TCP", "num_streams": o.lanes, "blksize": o.chunk_size, "omit": 0,
                           "duration": o.duration or 0, "bytes": o.nbytes or 0, "blocks": 0, "reverse": 0,
                           "tos": 0, "bidir": 0, "fqrate": o.fq_rate or 0, "interval": o.interval},
            "kvwire": {"hash": "xxh3_64" if o.hashing else "none", "chunk_size": o.chunk_size,
                       "congestion": r.congestion, "tls": o.tls, "key": bool(o.key),
                       "server": r.welcome.get("server"), "run": r.welcome.get("run")},
        },
        "intervals": r.intervals,
        "end": {
            "streams": streams,
            "sum_sent": {"start": 0.0, "end": seconds, "seconds": seconds, "bytes": sent_bytes,
                         "bits_per_second": sent_bytes * 8 / seconds, "retransmits": retrans, "sender": True},
            "sum_received": {"start": 0.0, "end": rx_seconds, "seconds": rx_seconds,
                             "bytes": payload_verified,
                             "bits_per_second": payload_verified * 8 / rx_seconds, "sender": False},
            "cpu_utilization_percent": {
                "host_total": 100 * tx_cpu / seconds,
                "host_user": 100 * max(0.0, r.cpu_user - r.fill_cpu) / seconds,
                "host_system": 100 * r.cpu_system / seconds,
                "remote_total": 100 * rx_cpu / seconds,
                "remote_user": 100 * max(0.0, rx_user) / seconds,
                "remote_system": 100 * float(srv.get("cpu_system", 0.0)) / seconds,
            },
            "sender_tcp_congestion": r.congestion,
            "receiver_tcp_congestion": srv.get("congestion", ""),
        },
        "kv": {
            "mode": "kv" if o.kv_mode else "raw",
            "model": o.model or "raw",
            "layout": {"name": r.layout.name, "num_layers": r.layout.num_layers, "tp_size": r.layout.tp_size,
                       "kv_bytes_per_token": r.layout.kv_bytes_per_token(),
                       "state_bytes_per_request": r.layout.state_bytes_per_request()},
            "tokens": r.tokens,
            "bytes_per_request": r.plan.total_bytes,
            "requests": len(timelines),
            "concurrency": o.concurrency,
            "prefill_ms_per_layer": o.prefill_ms,
            "hash": "xxh3_64" if o.hashing else "none",
            "chunk_size": o.chunk_size,
            "lanes": o.lanes,
            "payload_bytes": payload_verified,
            "wire_bytes": wire,
            "goodput_bits_per_second": payload_verified * 8 / rx_seconds,
            "clock_offset_s": r.clock_offset,
            "clock_uncertainty_s": r.clock_uncertainty,
            "exposed_tail_ms": _stats([t["exposed_tail_ms"] for t in verified
                                       if t["exposed_tail_ms"] is not None]),
            "transfer_ms": _stats([t["transfer_ms"] for t in verified if t["transfer_ms"] is not None]),
            "cpu": {"sender_s": tx_cpu, "receiver_s": rx_cpu, "sender_fill_s": r.fill_cpu,
                    "receiver_verify_s": float(srv.get("verify_cpu", 0.0)),
                    "cpu_s_per_gb": (tx_cpu + rx_cpu) / moved_gb if moved_gb else None},
            "receiver_memory": _memory(srv),
            "tail_parity": _parity(r.tail_parity, srv),
            "timeline": timelines,
            "verification": {
                "verified": ok,
                "requests_ok": len(verified),
                "requests_failed": len(timelines) - len(verified),
                "bytes_verified": payload_verified,
                "bytes_expected": sum(t["bytes"] for t in timelines),
                "seed": o.seed,
                "failures": [_failure_text(t) for t in timelines if not t["verified"]][:20],
                "session_error": r.error,
            },
        },
    }
    if r.probe is not None:
        doc["start"]["probe"] = r.probe
    if r.link_control is not None:
        doc["kv"]["link_control"] = r.link_control
    return doc


def _parity(per_group: int, srv: dict[str, Any]) -> dict[str, Any]:
    """Tail parity: per group (``--tail-parity``, or what ``connect``'s default chose for the path), and the
    receiving side's counters over the test (null when it sent none)."""
    got = srv.get("parity")
    counts: dict[str, Any] = got if isinstance(got, dict) else {}
    return {"per_group": per_group, **{k: counts.get(k) for k in parity.COUNTERS}}


def _memory(rec: dict[str, Any]) -> dict[str, Any]:
    """The receiving side's memory: peak RSS, RSS at the start, its pool, and the peak beyond the pool."""
    rss_peak, pool = rec.get("rss_peak"), rec.get("pool_bytes")
    return {"rss_peak": rss_peak, "rss_at_start": rec.get("rss_base"), "pool_bytes": pool,
            "beyond_pool": (rss_peak - pool) if isinstance(rss_peak, int) and isinstance(pool, int) else None}


def _timestamp(t: float) -> dict[str, Any]:
    return {"time": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t)), "timesecs": int(t)}


def build_server_document(rec: dict[str, Any]) -> dict[str, Any]:
    """What ``kvwire-bench -s -J`` prints after each test, from the server's record of it.

    Receiving (the normal direction): iperf3's ``start``/``intervals``/``end`` as seen by the receiver
    (``end.streams[].receiver`` per lane, ``sum_received`` = bytes verified), plus ``kv`` with each
    request's verdict and per-layer verified times (ms after the transfer began, this host's clock).
    Sending (the client asked for ``-R``): the sender's full run document, as the client gets it.
    A test that did not complete carries iperf3's top-level ``error``."""
    if rec.get("role") == "sender":
        sent = rec.get("doc")
        sdoc: dict[str, Any]
        if isinstance(sent, dict):
            sdoc = dict(sent)
            sdoc["kv"] = dict(sdoc["kv"], role="sender", direction="reverse")
        else:
            sdoc = {"start": {"version": f"kvwire-bench {__version__}", "system_info": " ".join(platform.uname()),
                              "timestamp": _timestamp(time.time())}, "intervals": [], "end": {},
                    "kv": {"role": "sender", "direction": "reverse"}}
        if rec.get("error"):
            sdoc["error"] = rec["error"]
        elif not rec.get("completed"):
            sdoc["error"] = "the client went away before the test completed"
        return sdoc
    results: list[dict[str, Any]] = list(rec.get("results") or [])
    wall0 = rec.get("wall0") or 0.0
    first, last = rec.get("first_begin"), rec.get("last_verified")
    seconds = max((last - first) if isinstance(first, float) and isinstance(last, float) else 0.0, 1e-9)
    verified_bytes = int(rec.get("bytes_verified") or 0)
    host, _, port = str(rec.get("peer", "")).rpartition(":")
    lanes = list(rec.get("lanes") or [])
    cpu_user, cpu_system = float(rec.get("cpu_user", 0.0)), float(rec.get("cpu_system", 0.0))
    verify_cpu = float(rec.get("verify_cpu", 0.0))
    wall = max(last - wall0, 1e-9) if isinstance(last, float) and wall0 else seconds
    requests = [{"request_id": x["rid"], "state": x["state"], "reason": x["reason"], "verified": bool(x["ok"]),
                 "bytes": x["bytes"], "bytes_checked": x["checked"], "bad_blocks": x["bad_blocks"],
                 "first_bad_offset": x["first_bad"],
                 "start": (x["begun"] - first) if isinstance(first, float) else None,
                 "layers": [{"layer": layer, "verified_ms": (t - x["begun"]) * 1e3} for layer, t in x["layers"]]}
                for x in results]
    ok = bool(rec.get("completed")) and int(rec.get("requests_failed") or 0) == 0 and bool(requests)
    doc: dict[str, Any] = {
        "start": {
            "connected": rec.get("connected") or [],
            "version": f"kvwire-bench {__version__}",
            "system_info": " ".join(platform.uname()),
            "timestamp": _timestamp(float(rec.get("accepted_at") or time.time())),
            "accepted_connection": {"host": host, "port": int(port) if port.isdigit() else 0},
            "test_start": {"protocol": "TCP", "num_streams": len(lanes), "reverse": 0},
            "kvwire": {"run": rec.get("run"), "data_port": rec.get("data_port")},
        },
        "intervals": [],
        "end": {
            "streams": [{"receiver": _receiver_stream(lane, seconds)} for lane in lanes],
            "sum_received": {"start": 0.0, "end": seconds, "seconds": seconds, "bytes": verified_bytes,
                             "bits_per_second": verified_bytes * 8 / seconds, "sender": False},
            "cpu_utilization_percent": {
                "host_total": 100 * max(0.0, cpu_user + cpu_system - verify_cpu) / wall,
                "host_user": 100 * max(0.0, cpu_user - verify_cpu) / wall,
                "host_system": 100 * cpu_system / wall,
            },
            "receiver_tcp_congestion": rec.get("congestion", ""),
        },
        "kv": {
            "role": "receiver",
            "direction": "forward",
            "requests": requests,
            "lane_wire_bytes": sum(int(lane.get("bytes") or 0) for lane in lanes),
            "cpu": {"receiver_s": max(0.0, cpu_user + cpu_system - verify_cpu), "receiver_verify_s": verify_cpu},
            "receiver_memory": _memory(rec),
            "verification": {"verified": ok, "requests_ok": int(rec.get("requests_ok") or 0),
                             "requests_failed": int(rec.get("requests_failed") or 0),
                             "bytes_verified": verified_bytes},
        },
    }
    if not rec.get("completed"):
        doc["error"] = "the client went away before the test completed"
    return doc
