"""Engine adapters: plug kvwire into an inference engine's own cache and request lifecycle.

Owns: nothing of its own beyond the shared state-position policy (``positions``); each engine lives in
its own submodule (``kvwire.adapters.transformers``, ``kvwire.adapters.vllm``, ``kvwire.adapters.sglang``)
and imports its engine lazily, so ``import kvwire`` and ``import kvwire.adapters`` never import an engine.
Must not know: the transport's internals; adapters use kvwire's public API only.
"""

from .positions import StatePolicy

__all__ = ["StatePolicy"]
