"""kvwire: KV-cache transfer for hybrid-attention LLMs over multi-lane TCP."""
