"""The front door's Prometheus metrics: one registry per front door, the metric families, and their exposition.

Owns: metric names, label sets and histogram buckets (``prometheus_client``: the reference client, its text
exposition is what every Prometheus scrapes, so we do not hand-format it). Must not know: routing, nodes'
protocol, HTTP serving. ``prometheus_client`` is imported here only (the ``prfaas`` extra).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Telemetry:
    """The families the orchestrator updates; ``exposition()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # process-wide: the front door's own process; *_created series are noise
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("prfaas_ttft_seconds", "Request arrival to first token sent, by prefill route.",
                              ["route"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("prfaas_tpot_seconds", "Mean time per output token after the first, per request.",
                              ["route"], buckets=TPOT_BUCKETS, registry=r)
        self.requests = Counter("prfaas_requests", "Completions by outcome.", ["outcome"], registry=r)
        self.decisions = Counter("prfaas_routing_decisions", "Prefill routing decisions by target cluster "
                                 "and why (threshold, override, fallback, retry).", ["target", "why"], registry=r)
        self.transfers = Counter("prfaas_transfers", "Prefill cache transfers by terminal state.", ["state"],
                                 registry=r)
        self.prefix_moves = Counter("prfaas_prefix_moves", "Cached prefixes moved between nodes before a "
                                    "prefill, by source and destination cluster.", ["src", "dst"], registry=r)
        self.reused_tokens = Counter("prfaas_reused_tokens", "Prompt tokens served from a prefix checkpoint.",
                                     registry=r)
        self.retries = Counter("prfaas_reprefills", "Requests re-prefilled locally after a failed prefill.",
                               ["why"], registry=r)
        self.conversions = Counter("prfaas_role_conversions", "Local nodes converted between roles.",
                                   ["node", "role"], registry=r)
        self.threshold = Gauge("prfaas_threshold_tokens", "The router's length threshold t now.", registry=r)
        self.planned = Gauge("prfaas_threshold_planned_tokens", "The planned threshold t*.", registry=r)
        self.queued = Gauge("prfaas_node_queued", "Requests waiting at each node.", ["node"], registry=r)
        self.running = Gauge("prfaas_node_running", "Requests running at each node.", ["node"], registry=r)
        self.healthy = Gauge("prfaas_node_healthy", "1 while the router routes to the node.", ["node"], registry=r)
        self.role = Gauge("prfaas_node_role", "1 for the node's current role.", ["node", "role"], registry=r)
        self.egress = Gauge("prfaas_egress_utilization", "Each PrfaaS node's egress utilization (0-1).",
                            ["node"], registry=r)
        self.congested = Gauge("prfaas_egress_congested", "1 while a PrfaaS node's egress is congested.",
                               ["node"], registry=r)
        self.planned_split = Gauge("prfaas_planned_instances", "The long loop's planned local split.",
                                   ["role"], registry=r)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
