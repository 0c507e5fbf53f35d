"""The residual-method Llama as Flax modules (docs/maths.md B, C): embeddings, the layer stack
(stack.py: one `lax.scan` over layers; layer.py: one layer and its scheme's hooks), the final
norm and the LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.config import ModelConfig
from jax_residual.connections.base import State
from jax_residual.embedding import ParallelVocabEmbedding, VocabEmbedding
from jax_residual.layer import layer_param_specs
from jax_residual.norm import GroupRMSNorm
from jax_residual.sharding import explicit_mesh_context, with_auto_axes
from jax_residual.stack import decode_stack, decoder_stack, observed_depth_weights


def rope_ratio_for(seq_len: int, cfg: ModelConfig) -> float:
    """The NTK ratio serving `seq_len` positions, or a clear error if it exceeds the config."""
    covered = cfg.max_position_embeddings * cfg.rope_ntk_ratio
    if seq_len <= covered:
        return cfg.rope_ntk_ratio
    if not cfg.rope_dynamic_ntk:
        raise ValueError(
            f"sequence length {seq_len} exceeds max_position_embeddings * rope_ntk_ratio = {covered:g}; "
            "set rope_dynamic_ntk=True to extend RoPE with the NTK rule"
        )
    with jax.ensure_compile_time_eval():  # the length is static: a Python float, also under jit
        return float(F.ntk_ratio_for_length(cfg.max_position_embeddings, cfg.rope_ntk_ratio, seq_len))


# ----------------------------------------------------------------------------- the Flax model


class DecoderStack(nn.Module):
    """Declares the stacked [L, ...] layer parameters and runs `decoder_stack` over them."""

    config: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos, sin, cache: State | None = None, record: bool = False):
        """x [b, s, h] -> [b, s, h]; with a decoding `cache`, (x, the extended cache); `record`:
        the scheme's mean depth weights [L R, S] instead (stack.observed_depth_weights)."""
        cfg = self.config
        layers = {
            name: self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
            for name, (shape, axes, init) in layer_param_specs(cfg).items()
        }
        weights = cfg.scheme.weights_for(cfg)  # connection weights stay float32
        layers = {name: value if name in weights else value.astype(x.dtype) for name, value in layers.items()}
        if cache is not None:
            return decode_stack(x, layers, cos, sin, cfg, cache)
        if record:
            return observed_depth_weights(x, layers, cos, sin, cfg, self.mesh)
        return decoder_stack(x, layers, cos, sin, cfg, self.mesh)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM with a residual method. `apply({"params": p}, input_ids [b, s])` -> float32
    logits [b, s, v]. Pass `inputs_embeds` [b, s, h] instead of ids to differentiate w.r.t. them.

    With a mesh, the activations (embeddings, attention in/out, MLP hidden, logits) and the
    layer scan's carry are constrained to their logical axes (sharding.py), and where the mesh
    splits the vocabulary the embedding is vocabulary-parallel (`ParallelVocabEmbedding`:
    shard_map lookup-and-zero + psum). Without one (None) nothing is constrained. The mesh may
    have Auto or Explicit axes (plain `jax.make_mesh`); inside `jax.set_mesh` of an Explicit
    mesh the layers run with Auto axes (`sharding.with_auto_axes`) and `init` must happen
    outside it.

    Decoding: `apply({"params": p}, ids [b, n], cache=cache)` with a cache from `empty_cache`
    runs the n tokens at positions cache["length"] + [0, n) against the cached ones and returns
    (logits [b, n, v], the extended cache): the logits equal those of the full sequence.
    """

    config: ModelConfig
    mesh: Mesh | None = None

    def setup(self):
        cfg = self.config
        if self.mesh is not None and sharding.mesh_ways(self.mesh, "vocab") > 1:
            self.embed_tokens = ParallelVocabEmbedding(
                cfg.vocab_size, cfg.hidden_size, self.mesh, axis_name=sharding.TENSOR_AXIS,
                init_std=cfg.initializer_range, init_base_seed=None, batch_axes=sharding.BATCH_AXES,
            )
        else:
            self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size,
                                               init_std=cfg.initializer_range, init_seed=None)
        self.layers = DecoderStack(cfg, self.mesh)
        self.norm = GroupRMSNorm(cfg.hidden_size, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                 init_range=(1.0, 1.0), init_seed=None)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.float32,
            )

    def __call__(self, input_ids, inputs_embeds=None, cache: State | None = None):
        if self.is_initializing() and explicit_mesh_context():
            raise ValueError("LlamaForCausalLM.init cannot run inside `jax.set_mesh(mesh)` of a mesh with Explicit axes: "
                             "initialise outside it (the model takes its mesh as `mesh=`), then apply inside or outside")
        if cache is not None:  # decoding: the batch layout of the cache is the caller's
            return self._logits(input_ids, inputs_embeds, cache)
        return with_auto_axes(self._logits, input_ids, inputs_embeds, cache)

    def observed_depth_weights(self, input_ids):
        """float32 [L R, S]: the scheme's input-dependent depth weights averaged over the batch
        and positions of input_ids [b, s] (`Connection.observes_weights`; stack.py). Called as
        `model.apply({"params": p}, ids, method=LlamaForCausalLM.observed_depth_weights)`,
        outside a `jax.set_mesh` context with Explicit axes."""
        x, cos, sin = self._embed(input_ids, None, None)
        return self.layers(x, cos, sin, record=True)

    def _embed(self, input_ids, inputs_embeds, cache):
        """(the embeddings [b, s, h] in the model's dtype, RoPE cos, sin of their positions)."""
        cfg = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3:
            raise ValueError(f"expected input_ids [b, s] or inputs_embeds [b, s, h], got embeddings of shape {x.shape}")
        x = sharding.constrain(x, ("batch", "seq", "embed"), self.mesh)
        seq_len = x.shape[1]
        if cache is None:
            positions, ratio = jnp.arange(seq_len), rope_ratio_for(seq_len, cfg)
        else:
            cache_len = cache["cache_k"].shape[2]
            if seq_len > cache_len:
                raise ValueError(f"{seq_len} new tokens do not fit a decoding cache of {cache_len} positions")
            positions, ratio = cache["length"] + jnp.arange(seq_len), rope_ratio_for(cache_len, cfg)
        cos, sin = F.rope_tables(cfg.head_dim, positions, cfg.rope_theta, ratio)
        return x.astype(jnp.dtype(cfg.dtype)), cos, sin

    def _logits(self, input_ids, inputs_embeds, cache):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x, cos, sin = self._embed(input_ids, inputs_embeds, cache)
        x = self.layers(x, cos, sin, cache)
        x, cache = (x, None) if cache is None else x
        x = self.norm(x)
        if cfg.tie_word_embeddings:
            head = nn.meta.unbox(self.embed_tokens.variables["params"]["embedding"]).T
        else:
            head = self.lm_head
        logits = F.einsum_f32("bsh,hv->bsv", x, head.astype(dtype))
        logits = sharding.constrain(logits, ("batch", "seq", "vocab"), self.mesh)
        return logits if cache is None else (logits, cache)
