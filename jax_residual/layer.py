"""One decoder layer l of docs/maths.md B0, with the hooks of its scheme (connections/base.py):

    y, write = connect("attention", X_l)       a_l = Attn_l(N1_l(y)):  q, k, v = projections of N1_l(y)
                                                     (of N1_l(y.q), N1_l(y.k), N1_l(y.v) for ProjectionInputs),
    H_l = write(a_l)                                 v <- mix_values(v), heads = attend(q, k, v)
    y, write = connect("mlp", H_l)             m_l = MLP_l(N2_l(y))
    X_{l+1} = after_block(write(m_l))

For `standard` every hook is the identity of the pre-norm layer: y = X_l, write(out) = X_l + out.
The layer never asks which scheme it runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.connections import LayerContext
from jax_residual.connections.base import Connection, ProjectionInputs, State
from jax_residual.params import LAYER_PARAMS, initializer


def layer_param_specs(cfg) -> dict:
    """name -> (stacked shape [L, ...], logical axes, initializer) of every per-layer parameter:
    the layer's own (params.LAYER_PARAMS) and its scheme's connection weights."""
    L = cfg.num_hidden_layers
    specs = {name: ((L, *param.shape(cfg)), ("layers", *param.axes), initializer(param, cfg))
             for name, param in LAYER_PARAMS.items()}
    for name, weight in cfg.scheme.weights_for(cfg).items():
        value = weight.init(cfg)
        specs[name] = (value.shape, ("layers", *weight.axes), _weight_initializer(value, weight, cfg))
    return specs


def _weight_initializer(value, weight, cfg):
    """init(cfg), plus a normal draw of std init_std(cfg) where the weight declares one."""
    if weight.init_std is None:
        return lambda key, shape, dtype: jnp.asarray(value, dtype)
    std = weight.init_std(cfg)
    return lambda key, shape, dtype: jnp.asarray(value, dtype) + std * jax.random.normal(key, shape, dtype)


def project_qkv(y, p, cos, sin, cfg):
    """Q, K (post-RoPE) and V of y [b, s, h] (or of y.q, y.k, y.v for `ProjectionInputs`):
    [b, s, nh, hd], [b, s, nkv, hd], [b, s, nkv, hd].

    The projections run on the flattened tokens [b*s, h] (2-D matmuls; see F.swiglu).
    """
    y = y if isinstance(y, ProjectionInputs) else ProjectionInputs(y, y, y)
    b, s, h = y.q.shape
    q = (y.q.reshape(b * s, h) @ p["q_proj"]).reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
    k = (y.k.reshape(b * s, h) @ p["k_proj"]).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    v = (y.v.reshape(b * s, h) @ p["v_proj"]).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    return F.apply_rotary_pos_emb(q, cos, sin), F.apply_rotary_pos_emb(k, cos, sin), v


def attention_sublayer(y, state: State, cos, sin, scheme: Connection, ctx: LayerContext):
    """(a_l = Attn_l(N1_l(y)) [b, s, h], state): the layer writes its attention to the store and
    attends as its scheme says. y: [b, s, h], or `ProjectionInputs` (N1_l applied to each)."""
    p, cfg, mesh = ctx.params, ctx.cfg, ctx.mesh
    norm = lambda a: F.group_rms_norm(a, p["input_layernorm"], cfg.hidden_size, cfg.rms_norm_eps)
    normed = ProjectionInputs(*map(norm, y)) if isinstance(y, ProjectionInputs) else norm(y)
    q, k, v = project_qkv(normed, p, cos, sin, cfg)
    b, s = q.shape[:2]
    q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"), mesh)
    k, v = (sharding.constrain(a, ("batch", "seq", "kv_heads", "head_dim"), mesh) for a in (k, v))
    v, state = scheme.mix_values(v, state, ctx)
    state = ctx.memory.write(state, ctx.index, q, k, v)
    heads = scheme.attend(q, k, v, state, ctx)
    out = (heads.reshape(b * s, -1) @ p["o_proj"]).reshape(b, s, -1)
    return sharding.constrain(out, ("batch", "seq", "embed"), mesh), state


def mlp_sublayer(y, ctx: LayerContext):
    """m_l = MLP_l(N2_l(y)) [b, s, h]; the hidden activation [b*s, i] is split like the batch."""
    p, cfg = ctx.params, ctx.cfg
    return F.swiglu(F.group_rms_norm(y, p["post_attention_layernorm"], cfg.hidden_size, cfg.rms_norm_eps),
                    p["gate_proj"], p["up_proj"], p["down_proj"],
                    constrain_hidden=lambda a: sharding.constrain(a, ("batch", "mlp"), ctx.mesh))


def decoder_layer(x, state: State, layer, p, layers, cos, sin, cfg, scheme: Connection, memory, mesh=None,
                  record: bool = False):
    """Layer l. x: the residual stream X_l [b, s, h] (a scheme's own layout, e.g. [n, b, s, h]
    for hyper-connections); state: the carry fields of the scheme and of its attention store;
    p: this layer's params; layers: every layer's params stacked [L, ...] (to re-run earlier
    layers); memory: the attention store (stores.py). Activations and the written carry are
    constrained to their logical axes on `mesh` (sharding.py; no-op without one). `record`: the
    hooks also `observe` the layer's depth weights (state[OBSERVED], stack.observed_depth_weights).
    Returns (X_{l+1}, state)."""
    ctx = LayerContext(index=layer, params=p, layers=layers, layer_input=x, cfg=cfg, memory=memory, mesh=mesh,
                       record=record)
    y, write, state = scheme.connect("attention", x, state, ctx)
    attention_out, state = attention_sublayer(y, state, cos, sin, scheme, ctx)
    y, write, state = scheme.connect("mlp", write(attention_out), state, ctx)
    return scheme.after_block(write(mlp_sublayer(y, ctx)), state, ctx)
