"""Which token position the shipped recurrent state stands at: the N vs N-1 convention, made explicit.

Owns: ``StatePolicy``, the one place that says how many prompt tokens prefill computes, how many tokens
of KV and state cross the wire, and which tokens decode must still feed itself. Must not know: engines,
sockets, buffers.

- ``N``: prefill computes all N prompt tokens; KV for N tokens and the state after N tokens cross; decode
  starts from the first generated token (it needs the prefill's last logits or its first token).
- ``N_MINUS_1``: prefill computes N-1 tokens (vLLM's NIXL convention for Mamba, so decode can produce the
  first token's logits itself); KV for N-1 tokens and the state after N-1 tokens cross; decode feeds the
  last prompt token first.
"""

from __future__ import annotations

import enum

from ..errors import LayoutError


class StatePolicy(enum.Enum):
    N = "N"
    N_MINUS_1 = "N-1"

    @classmethod
    def parse(cls, value: StatePolicy | str) -> StatePolicy:
        if isinstance(value, StatePolicy):
            return value
        for p in cls:
            if value in (p.value, p.name):
                return p
        raise LayoutError(f"state policy must be 'N' or 'N-1', not {value!r}")

    def prefill_tokens(self, num_prompt_tokens: int) -> int:
        """How many prompt tokens prefill computes (and whose KV and state cross the wire)."""
        if isinstance(num_prompt_tokens, bool) or not isinstance(num_prompt_tokens, int):
            raise TypeError(f"num_prompt_tokens must be an int, not {type(num_prompt_tokens).__name__}")
        need = 2 if self is StatePolicy.N_MINUS_1 else 1
        if num_prompt_tokens < need:
            raise LayoutError(f"policy {self.value} needs a prompt of at least {need} tokens, got {num_prompt_tokens}")
        return num_prompt_tokens - 1 if self is StatePolicy.N_MINUS_1 else num_prompt_tokens

    def state_position(self, num_prompt_tokens: int) -> int:
        """The ``RequestSpec.state_position`` a transfer under this policy carries."""
        return self.prefill_tokens(num_prompt_tokens)

    def decode_feed(self, num_prompt_tokens: int) -> slice:
        """Which prompt tokens decode must feed before its first sampled token (empty under ``N``)."""
        return slice(self.prefill_tokens(num_prompt_tokens), num_prompt_tokens)
