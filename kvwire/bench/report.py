"""What the client prints: iperf3-style text, one JSON document (``-J``) or JSON lines (``--json-stream``).

Owns: unit formatting as iperf3 does it (bytes in powers of 1024, bits/s in powers of 1000, three
significant digits), the interval lines per lane plus a SUM line (and, with ``--adaptive``, a LNK line:
the link controller's view), the ``--probe`` line before the test, the closing summary (goodput, payload
vs wire bytes, CPU, hash mode, exposed tail, memory, link control, verification) and the per-layer table.
Must not know: sockets, sessions or how the numbers were measured (it reads the document).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .document import percentile
from .options import Options

SEP = "- " * 30


def _scaled(v: float, base: int, units: tuple[str, ...]) -> str:
    i = 0
    while abs(v) >= base and i < len(units) - 1:
        v /= base
        i += 1
    text = f"{v:.2f}" if abs(v) < 9.995 else f"{v:.1f}" if abs(v) < 99.95 else f"{v:.0f}"
    return f"{text} {units[i]}"


def fmt_bytes(n: float) -> str:
    return _scaled(float(n), 1024, ("Bytes", "KBytes", "MBytes", "GBytes", "TBytes"))


def fmt_rate(bps: float) -> str:
    return _scaled(float(bps), 1000, ("bits/sec", "Kbits/sec", "Mbits/sec", "Gbits/sec", "Tbits/sec"))


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms" if abs(v) >= 10 else f"{v:.2f} ms"


def _rtt(us: Any) -> str:
    if not isinstance(us, (int, float)):
        return "-"
    return f"{us / 1000:.2f}ms" if us >= 1000 else f"{int(us)}us"


def _cwnd(b: Any) -> str:
    return fmt_bytes(b) if isinstance(b, (int, float)) else "-"


def interval_lines(rec: dict[str, Any], show_streams: bool = True) -> list[str]:
    out = []
    if show_streams:
        for s in rec["streams"]:
            out.append(f"[{s['socket']:3d}] {s['start']:6.2f}-{s['end']:<6.2f} sec  "
                       f"{fmt_bytes(s['bytes']):>11}  "
                       f"{fmt_rate(s['bits_per_second']):>15}  {s['retransmits']:4d}  {_rtt(s['rtt']):>8}  "
                       f"{_cwnd(s['snd_cwnd']):>11}")
    s = rec["sum"]
    out.append(f"[SUM] {s['start']:6.2f}-{s['end']:<6.2f} sec  {fmt_bytes(s['bytes']):>11}  "
               f"{fmt_rate(s['bits_per_second']):>15}  {s['retransmits']:4d}  {_rtt(s['rtt']):>8}  "
               f"{_cwnd(s['snd_cwnd']):>11}  lanes {s['active_lanes']}/{len(rec['streams'])}")
    link = rec.get("link")
    if isinstance(link, dict):
        out.append(control_line(s["start"], s["end"], link))
    return out


def _gbit(bytes_per_s: Any) -> str:
    return f"{bytes_per_s * 8 / 1e9:.2f} Gbit/s" if isinstance(bytes_per_s, (int, float)) else "-"


def _pct(v: Any) -> str:
    return f"{100 * v:.0f}%" if isinstance(v, (int, float)) else "-"


def _num(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``v`` formatted with ``spec`` (after ``scale``), or "-" when it is not a number (None: unknown)."""
    return f"{v * scale:{spec}}{suffix}" if isinstance(v, (int, float)) else "-"


def control_line(start: float, end: float, link: dict[str, Any]) -> str:
    """``--adaptive``: the link controller's view when the interval closed (rates in bytes/s in ``link``)."""
    cap = link.get("capacity")
    pacing = link.get("pacing")
    return (f"[LNK] {start:6.2f}-{end:<6.2f} sec  capacity "
            f"{fmt_rate(cap * 8) if isinstance(cap, (int, float)) else '-':>15}  "
            f"util {_pct(link.get('utilization')):>4}  queue "
            f"{_num(link.get('queueing_ratio'), '.2f', suffix='x'):>6}  "
            f"loss {_num(link.get('loss_rate'), '.2f', 100, '%'):>6}  "
            f"{'CONGESTED' if link.get('congested') else 'clear':<9}  {link.get('mode', '?'):<7}  "
            f"lanes {link.get('lanes', '?')}  paced {fmt_rate(pacing * 8) if pacing else 'no'}")


def _rtt_ms(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 1 else fmt_ms(ms)


def probe_line(p: dict[str, Any]) -> str:
    """``--probe``: what the probe measured, before the test."""
    line = (f"probe: capacity {_gbit(p.get('capacity'))} "
            f"({'saturated' if p.get('saturated') else 'lower bound'}), "
            f"min RTT {_rtt_ms(p.get('min_rtt'))}, "
            f"max queueing ratio {_num(p.get('max_queueing_ratio'), '.2f')}, "
            f"loss {_num(p.get('loss_rate'), '.2f', 100, '%')}, "
            f"{p.get('lanes')} lanes, {p.get('congestion') or '?'}, {p.get('seconds', 0.0):.2f} s, "
            f"{(p.get('bytes_sent') or 0) / 1e6:.1f} MB (not counted in the test)")
    if not p.get("drained", True):
        line += "; lanes not drained when it ended"
    notes = p.get("notes") or []
    return line + "".join(f"\n       note: {n}" for n in notes)


def link_control_line(lc: dict[str, Any]) -> str:
    """``--adaptive``: the controller over the whole test, for the summary."""
    pacing = lc.get("pacing")
    seed = lc.get("capacity_seed")
    return (f"Link control   {'polite, ' if lc.get('polite') else ''}{lc.get('congestion') or 'kernel default'}, "
            f"lanes {lc.get('min_lanes')}..{lc.get('max_lanes')} from {lc.get('initial_lanes')}"
            f"{f', capacity seeded {_gbit(seed)} by the probe' if seed else ''}: "
            f"{lc.get('decisions')} decision(s), last mode {lc.get('mode')} with {lc.get('lanes')} lanes, "
            f"{f'paced {fmt_rate(pacing * 8)}' if pacing else 'unpaced'}; last decision: {lc.get('reason')}")


HEADER = "[ ID] Interval           Transfer     Bitrate         Retr       RTT         Cwnd"


def layer_table(doc: dict[str, Any]) -> list[str]:
    """Median over verified requests of each layer's produced and verified-at-receiver times."""
    kv = doc["kv"]
    timelines = [t for t in kv["timeline"] if t["verified"]] or kv["timeline"]
    if not timelines:
        return []
    n = len(timelines[0]["layers"])
    out = [f"Per-layer timeline (ms after send(); median over {len(timelines)} request(s); "
           "verified = all chunks of the layer checked at the receiver)",
           "layer  cache       bytes      produced   verified        lag"]
    for i in range(n):
        layer = timelines[0]["layers"][i]
        prod = percentile([t["layers"][i]["produced_ms"] for t in timelines
                           if t["layers"][i]["produced_ms"] is not None], 50)
        ver = percentile([t["layers"][i]["verified_ms"] for t in timelines
                          if t["layers"][i]["verified_ms"] is not None], 50)
        lag = None if prod is None or ver is None else ver - prod
        kinds = "+".join(layer["kinds"]) or "-"
        out.append(f"{i:5d}  {kinds:<8} {fmt_bytes(layer['bytes']):>11}  {fmt_ms(prod):>10} "
                   f"{fmt_ms(ver):>10} {fmt_ms(lag):>10}")
    return out


def link_line(link: dict[str, Any]) -> str:
    """The emulated link in one line (``--emulate``)."""
    return (f"Emulated link  rtt {link['rtt_ms']:g} ms, loss {100 * link['loss']:g}%, rate "
            f"{link['rate_mbit']:g} Mbit/s, drop-tail queue {fmt_bytes(link['queue_bytes'])}, mtu {link['mtu']}: "
            f"client {link['client_addr']} <-> server {link['server_addr']} (network namespaces"
            + (f", {link['emulator_backend']} emulator)" if link.get("emulator_backend") else ")"))


def summary_lines(doc: dict[str, Any], verbose_layers: bool = True) -> list[str]:
    end, kv = doc["end"], doc["kv"]
    out = [SEP, "[ ID] Interval           Transfer     Bitrate         Retr"]
    if doc["start"]["test_start"].get("reverse"):
        out[0] = SEP + "\nReverse mode: the server sent, this host received and verified"
    for st in end["streams"]:
        s = st["sender"]
        out.append(f"[{s['socket']:3d}] {0:6.2f}-{s['end']:<6.2f} sec  {fmt_bytes(s['bytes']):>11}  "
                   f"{fmt_rate(s['bits_per_second']):>15}  {s['retransmits']:4d}             sender")
    ss, sr = end["sum_sent"], end["sum_received"]
    out.append(f"[SUM] {0:6.2f}-{ss['end']:<6.2f} sec  {fmt_bytes(ss['bytes']):>11}  "
               f"{fmt_rate(ss['bits_per_second']):>15}  {ss['retransmits']:4d}             sender")
    out.append(f"[SUM] {0:6.2f}-{sr['end']:<6.2f} sec  {fmt_bytes(sr['bytes']):>11}  "
               f"{fmt_rate(sr['bits_per_second']):>15}                   receiver (verified)")
    if kv["mode"] == "kv" and verbose_layers:
        out.append("")
        out.extend(layer_table(doc))
    out.append("")
    lay = kv["layout"]
    what = (f"{kv['model']} ({lay['num_layers']} layers, tp {lay['tp_size']}), {kv['tokens']} tokens"
            if kv["mode"] == "kv" else f"raw ({lay['num_layers']} layers)")
    mb = kv["bytes_per_request"] / 1e6
    out.append(f"Payload        {what}: {mb:.1f} MB x {kv['requests']} request(s), "
               f"{kv['lanes']} lanes, concurrency {kv['concurrency']}")
    out.append(f"Goodput        {kv['goodput_bits_per_second'] / 1e9:.2f} Gbit/s "
               f"({kv['payload_bytes'] / 1e6:.1f} MB verified at the receiver in {sr['seconds']:.2f} s)")
    wire = kv["wire_bytes"]
    eff = f"{100 * kv['payload_bytes'] / wire:.2f}%" if wire else "-"
    out.append(f"Payload/wire   {kv['payload_bytes'] / 1e6:.1f} MB payload, {wire / 1e6:.1f} MB of TCP "
               f"payload on lanes + control ({eff}; chunk headers, control, re-sends)")
    out.append(f"Hashing        {'xxh3_64 per chunk' if kv['hash'] != 'none' else 'off (--no-hash)'}; "
               f"chunk {fmt_bytes(kv['chunk_size'])}; every byte also checked against the pattern")
    cpu, util = kv["cpu"], end["cpu_utilization_percent"]
    per_gb = f"{cpu['cpu_s_per_gb']:.2f} CPU-s/GB" if cpu["cpu_s_per_gb"] is not None else "- CPU-s/GB"
    reverse = bool(doc["start"]["test_start"].get("reverse"))
    tx_util, rx_util = (util["remote_total"], util["host_total"]) if reverse else \
        (util["host_total"], util["remote_total"])
    out.append(f"CPU            sender {cpu['sender_s']:.2f} s ({tx_util:.0f}% of a core), "
               f"receiver {cpu['receiver_s']:.2f} s ({rx_util:.0f}%): {per_gb} "
               f"[excludes payload fill {cpu['sender_fill_s']:.2f} s, "
               f"pattern check {cpu['receiver_verify_s']:.2f} s]")
    tail = kv["exposed_tail_ms"]
    if tail["p50"] is not None:
        out.append(f"Exposed tail   p50 {fmt_ms(tail['p50'])}, p99 {fmt_ms(tail['p99'])} over "
                   f"{kv['verification']['requests_ok']} request(s) (last layer verified - last layer "
                   f"produced; clocks aligned to +/-{kv['clock_uncertainty_s'] * 1e3:.2f} ms)")
    par = kv.get("tail_parity") or {}
    if par.get("per_group"):
        got = ("the receiver sent no counts" if par.get("parity_chunks") is None else
               f"{par['parity_chunks']} parity chunks verified, {par['chunks_rebuilt']} data chunks rebuilt before "
               f"their copies arrived ({par['parity_rejected']} parity refused, {par['rebuilds_failed']} rebuilds "
               "failed)")
        out.append(f"Tail parity    {par['per_group']} per group of the last layer: {got}")
    mem = kv["receiver_memory"]
    if isinstance(mem["rss_peak"], int) and isinstance(mem["pool_bytes"], int):
        out.append(f"Receiver RSS   peak {mem['rss_peak'] / 2**20:.0f} MiB = destination pool "
                   f"{mem['pool_bytes'] / 2**20:.0f} MiB + {mem['beyond_pool'] / 2**20:.0f} MiB other "
                   "(interpreter, libraries, transport)")
    link = doc["start"].get("emulated_link")
    if isinstance(link, dict):
        out.append(link_line(link))
        st = kv.get("emulated_link_stats")
        if isinstance(st, dict) and isinstance(st.get("c2s"), dict) and isinstance(st.get("s2c"), dict):
            out.append("               emulator drops: " + ", ".join(
                f"{d} {st[d].get('random_drops', 0)} random + {st[d].get('queue_drops', 0)} queue"
                for d in ("c2s", "s2c")))
    lc = kv.get("link_control")
    if isinstance(lc, dict):
        out.append(link_control_line(lc))
    v = kv["verification"]
    if v["verified"]:
        n = v["requests_ok"] + v["requests_failed"]
        out.append(f"Verification   OK: {v['requests_ok']}/{n} requests, "
                   f"{v['bytes_verified'] / 1e6:.1f} MB checked byte for byte by the "
                   + ("receiver (this host)" if reverse else "server"))
    else:
        out.append(f"Verification   FAILED: {v['requests_ok']} of {v['requests_ok'] + v['requests_failed']} "
                   f"requests verified ({v['bytes_verified']} of {v['bytes_expected']} bytes)")
        for f in v["failures"][:5]:
            out.append(f"               {f}")
        if v["session_error"]:
            out.append(f"               session: {v['session_error']}")
    return out


class Reporter:
    """Prints as the run goes (text or JSON lines) and at the end (text or one document)."""

    def __init__(self, o: Options, out: TextIO | None = None, link: dict[str, Any] | None = None) -> None:
        self.o = o
        self.link = link
        self.out = out or sys.stdout
        self.text = not (o.json or o.json_stream)
        self._header_done = False

    def _emit(self, event: str, data: Any) -> None:
        self.out.write(json.dumps({"event": event, "data": data}) + "\n")
        self.out.flush()

    def line(self, text: str) -> None:
        if self.text:
            self.out.write(text + "\n")
            self.out.flush()

    def start(self, info: dict[str, Any]) -> None:
        if self.o.json_stream:
            self._emit("start", {"connected": info["connected"], "connecting_to": {
                "host": self.o.host, "port": self.o.port, "data_port": info["data_port"]},
                "bytes_per_request": info["bytes_per_request"], "tokens": info["tokens"],
                "layout": info["layout"].name, "reverse": int(self.o.reverse)}
                | ({"emulated_link": self.link} if self.link is not None else {})
                | {k: info[k] for k in ("probe", "link_control") if k in info})
            return
        o = self.o
        if self.link is not None:
            self.line(link_line(self.link))
        if o.reverse:
            self.line(f"Connecting to host {o.host}, port {o.port}")
            self.line(f"Reverse mode, remote host {o.host} is sending to kvwire data port {info['data_port']} "
                      "here (lanes as the sender sees them:)")
        else:
            self.line(f"Connecting to host {o.host}, port {o.port} (kvwire data port {info['data_port']})")
        for c in info["connected"]:
            self.line(f"[{c['socket']:3d}] local {c['local_host']} port {c['local_port']} connected to "
                      f"{c['remote_host']} port {c['remote_port']}")
        layout = info["layout"]
        what = (f"{o.model}: {layout.num_layers} layers, tp {layout.tp_size}, {info['tokens']} tokens"
                if o.kv_mode else "raw payload")
        amount = (f"{o.requests} request(s)" if o.requests is not None else
                  f"{o.duration:g} s" if o.duration is not None else f"{fmt_bytes(o.nbytes or 0)}")
        self.line(f"{what} = {info['bytes_per_request'] / 1e6:.1f} MB per request; {amount}, concurrency "
                  f"{o.concurrency}, hash {'xxh3_64' if o.hashing else 'none'}, "
                  f"chunk {fmt_bytes(o.chunk_size)}, "
                  f"congestion {info['congestion'] or '?'}"
                  + (f", prefill {o.prefill_ms:g} ms/layer" if o.prefill_ms else "")
                  + ((", polite" if o.polite else ", adaptive") if o.adaptive else ""))
        if isinstance(info.get("probe"), dict):
            self.line(probe_line(info["probe"]))

    def interval(self, rec: dict[str, Any]) -> None:
        if self.o.json_stream:
            self._emit("interval", rec)
            return
        if not self._header_done:
            self.line(HEADER)
            self._header_done = True
        for text in interval_lines(rec, show_streams=self.o.lanes > 1):
            self.line(text)

    def request(self, rec: dict[str, Any]) -> None:
        if self.o.json_stream:
            self._emit("request", rec)
        elif rec["state"] != "done":
            self.line(f"request {rec['request_id']} {rec['state']}: {rec['reason']}")

    def finish(self, doc: dict[str, Any]) -> None:
        if self.o.json:
            self.out.write(json.dumps(doc, indent=2) + "\n")
        elif self.o.json_stream:
            self._emit("end", doc["end"])
            self._emit("kv", doc["kv"])
        else:
            for text in summary_lines(doc):
                self.line(text)
        self.out.flush()

    def error(self, message: str) -> None:
        if self.o.json:
            self.out.write(json.dumps({"error": message}) + "\n")
        elif self.o.json_stream:
            self._emit("error", message)
        else:
            sys.stderr.write(f"kvwire-bench: error - {message}\n")
        self.out.flush()
