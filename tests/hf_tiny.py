"""Tiny transformers models built from config (CPU, seeded, ``initializer_range=0.5``) for the HF adapter tests.

At the default init (0.02) a zeroed layer state still yields the same greedy tokens, so a negative control
proves nothing there; at 0.5 it moves logits by whole units and changes tokens.
"""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=128, initializer_range=0.5)

TINY: dict[str, dict[str, Any]] = {
    # GDN + full attention; asymmetric K/V head dims so a transposed state cannot pass
    "qwen3_next": dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
                       full_attention_interval=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_expand=2, mamba_d_conv=4),
    "falcon_h1": dict(num_hidden_layers=2, head_dim=16, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1, mamba_d_conv=4, mamba_d_ssm=64, mamba_chunk_size=8),
    # transformers 5 form: layers_block_type, no num_hidden_layers in to_dict(); an MLP layer without cache
    "nemotron_h": dict(layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
                       head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
                       conv_kernel=4, chunk_size=8),
    "granitemoehybrid": dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8,
                             mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4,
                             mamba_chunk_size=8, num_local_experts=2, num_experts_per_tok=1),
    "zamba2": dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"], mamba_d_state=8,
                   mamba_ngroups=1, mamba_d_conv=4, n_mamba_heads=8, chunk_size=8, use_mem_eff_path=False,
                   num_mem_blocks=1),
    "mamba2": dict(num_hidden_layers=2, num_heads=8, head_dim=16, state_size=8, n_groups=2, conv_kernel=4,
                   expand=2, chunk_size=8),
    "llama": dict(num_hidden_layers=2, head_dim=16),
}


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type]})


def tiny_model(model_type: str, seed: int = 0, dtype: Any = None) -> Any:
    """The same weights in every process for the same ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_config(tiny_config(model_type), **kw).eval()


def prompt(n: int = 12, seed: int = 1) -> Any:
    import torch

    return torch.randint(0, COMMON["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))
