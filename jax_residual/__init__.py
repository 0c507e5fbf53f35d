"""jax_residual: Llama-style decoders whose residual connections reach back across layers."""

from jax_residual.functional import apply_rotary_pos_emb
from jax_residual.embedding import ParallelVocabEmbedding, VocabEmbedding, parallel_embedding_shard
from jax_residual.norm import GroupRMSNorm
from jax_residual.rope import NTKAwareRoPE
from jax_residual.connections import (METHOD_NAMES, Connection, LayerContext, StateField, Weight, method_names,
                                      register)
from jax_residual.config import ModelConfig
from jax_residual.model import LlamaForCausalLM
