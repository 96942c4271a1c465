"""The reference PrfaaS (Prefill-as-a-Service, arXiv 2604.15039) server built on kvwire's public API.

``model`` (the throughput model and deterministic search, pure; over ``profile`` curves and
``lengths`` distributions; ``paper`` holds the §4 case study's figures), ``sim`` (a discrete-event
simulator driving the router on a simulated clock), ``profiler`` (measures a served model's curves; imports
torch), ``router`` (length-threshold, cache-aware routing and the short/long control loops, pure),
``workload`` (synthetic lengths and payload patterns), ``server`` (prefill instances streaming layers to
decode peers, exposing the egress ``LinkState``), ``demo`` (``python -m kvwire.prfaas.demo``).
Must not know: kvwire internals beyond the public API and ``LinkState``.
"""

from .model import DecodeProfile, Deployment, KvSize, PrefillProfile, Throughput, paper_deployment, plan
from .router import PD, PRFAAS, RouteDecision, Router, RouterConfig, RouteRequest
from .server import JobReport, PrefillJob, PrfaasServer, SimulatedPrefill

__all__ = [
    "PD", "PRFAAS", "DecodeProfile", "Deployment", "JobReport", "KvSize", "PrefillJob", "PrefillProfile",
    "PrfaasServer", "RouteDecision", "RouteRequest", "Router", "RouterConfig", "SimulatedPrefill", "Throughput",
    "paper_deployment", "plan",
]


def __getattr__(name: str) -> object:
    """``kvwire.prfaas.Decision``, the router's decision before it was named ``RouteDecision`` (one name,
    one thing: ``kvwire.congestion.controller.Decision`` is the congestion controller's)."""
    if name == "Decision":
        import warnings

        warnings.warn("kvwire.prfaas.Decision is now kvwire.prfaas.RouteDecision", DeprecationWarning, stacklevel=2)
        return RouteDecision
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
