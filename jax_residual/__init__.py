"""jax_residual: Llama-style decoders whose residual connections reach back across layers."""

from jax_residual.functional import apply_rotary_pos_emb
