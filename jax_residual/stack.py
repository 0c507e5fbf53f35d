"""The layer stack: one `lax.scan` over the L layers (docs/maths.md B4), whose carry is
(X_l, state): the residual stream and the fields declared by the scheme (`state_fields`) and by
its attention store (stores.py), e.g. the post-RoPE Q and K of every layer so far (fixed [L, ...]
buffers filled as the scan advances). The HLO holds one layer body whatever L is.

`observed_depth_weights`: the same scan, forward only, with the scheme's hooks recording their
input-dependent depth weights (`Connection.observes_weights`) as the scan's per-layer output.

Backward pass: the plain scan's autodiff saves the carry at every layer; `stateful_stack` is the
written-once custom VJP that keeps only each layer's input and the final carry (`remat="layer"`,
and always for a `final_only` field).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_residual import sharding
from jax_residual.connections.base import OBSERVED, State, StateField
from jax_residual.layer import decoder_layer
from jax_residual.stores import DecodeCache, attention_store


def carry_fields(cfg) -> dict[str, StateField]:
    """The carry fields of a full-sequence pass: the scheme's and its attention store's."""
    return cfg.scheme.state_fields(cfg) | attention_store(cfg, cfg.scheme).fields()


def constrain_state(state: State, fields: dict[str, StateField], mesh: Mesh | None) -> State:
    """Each carry field constrained to its declared logical axes on `mesh` (none without one)."""
    if mesh is None:
        return state
    return {name: sharding.constrain(value, fields[name].axes, mesh) for name, value in state.items()}


def initial_state(x, cfg, fields: dict[str, StateField], mesh: Mesh | None = None) -> State:
    """The carry fields before layer 0, from the embeddings x [b, s, h]."""
    b, s, _ = x.shape
    state = {}
    for name, field in fields.items():
        zeros = jnp.zeros(field.shape(cfg, b, s), x.dtype if field.dtype == "compute" else jnp.float32)
        state[name] = zeros if field.initial is None else field.initial(x.astype(zeros.dtype), zeros)
    return constrain_state(state, fields, mesh)


def layer_body(cfg, memory, fields: dict[str, StateField], mesh: Mesh | None):
    """The scan body: ((X_l, state), (l, params_l), layers, cos, sin) -> (X_{l+1}, state), the
    written carry constrained to its logical axes."""
    scheme = cfg.scheme

    def body(carry, layer, p, layers, cos, sin):
        x, state = decoder_layer(*carry, layer, p, layers, cos, sin, cfg, scheme, memory, mesh)
        return x, constrain_state(state, fields, mesh)

    return body


def decoder_stack(x, layers, cos, sin, cfg, mesh: Mesh | None = None):
    """All L layers as one scan. x [b, s, h]; layers: params stacked [L, ...]; mesh: where the
    activations and the carry are constrained (None: no constraint). Returns [b, s, h].

    `attention_state` "auto" is resolved here from x's batch and sequence length. The stack is
    the `stateful_stack` custom VJP (only the final state kept) when every state field is
    written once and remat="layer" asks for it or a field is `final_only`; otherwise the plain
    scan (its body checkpointed with remat="layer": an accumulated field, e.g. method 5's
    running score sum in "probs", is then saved at every layer, one layer's size each time).
    """
    cfg = cfg.with_attention_state(*x.shape[:2])
    scheme = cfg.scheme
    fields = carry_fields(cfg)
    state = initial_state(x, cfg, fields, mesh)
    stream = scheme.enter(x, cfg, mesh)
    keep_final_only = cfg.remat == "layer" or any(field.final_only for field in fields.values())
    if state and keep_final_only and all(field.written_once for field in fields.values()):
        return scheme.leave(stateful_stack(stream, state, layers, cos, sin, cfg, mesh))
    step = layer_body(cfg, attention_store(cfg, scheme), fields, mesh)

    def body(carry, xs):
        return step(carry, *xs, layers, cos, sin), None

    if cfg.remat == "layer":
        body = jax.checkpoint(body)
    (stream, _), _ = jax.lax.scan(body, (stream, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return scheme.leave(stream)


def observed_depth_weights(x, layers, cos, sin, cfg, mesh: Mesh | None = None):
    """The scheme's input-dependent depth weights, averaged over the batch and positions of
    x [b, s, h]: float32 [L R, S], row l R + r the r-th row layer l's hooks `observe` (R per layer,
    S sources: see the scheme's `observes_weights`). A forward-only plain scan (no logits, no
    custom VJP): a function of its own, compiled apart from the training step."""
    cfg = cfg.with_attention_state(*x.shape[:2])
    scheme = cfg.scheme
    if not scheme.observes_weights(cfg):
        raise ValueError(f"{cfg.residual_method}: its depth weights do not depend on the tokens (observes_weights "
                         "is False); its plotted matrix is Connection.learned_matrix(params, cfg)")
    fields = carry_fields(cfg)
    memory = attention_store(cfg, scheme)

    def body(carry, xs):
        stream, state = decoder_layer(*carry, *xs, layers, cos, sin, cfg, scheme, memory, mesh, record=True)
        carried = {name: value for name, value in state.items() if name != OBSERVED}
        return (stream, constrain_state(carried, fields, mesh)), state[OBSERVED]

    carry = (scheme.enter(x, cfg, mesh), initial_state(x, cfg, fields, mesh))
    _, rows = jax.lax.scan(body, carry, (jnp.arange(cfg.num_hidden_layers), layers))  # [L, R, S]
    return rows.reshape(-1, rows.shape[-1])


def decode_stack(x, layers, cos, sin, cfg, cache: State):
    """The layer scan over new tokens x [b, n, h] at positions cache["length"] + [0, n), reading
    and extending the decoding cache (`stores.DecodeCache`). Returns ([b, n, h], the extended cache)."""
    scheme = cfg.scheme
    b, n, _ = x.shape
    fields = scheme.state_fields(cfg)  # per step; the stored attention is the cache's
    cached = {name: value for name, value in cache.items() if name != "length"}
    state = {**initial_state(x, cfg, fields), **cached}
    if scheme.stores_attention:
        state["step_q"] = jnp.zeros((cfg.num_hidden_layers, b, n, cfg.num_attention_heads, cfg.head_dim), x.dtype)
    step = layer_body(cfg, DecodeCache(cfg, cache["length"]), fields, None)

    def body(carry, xs):
        return step(carry, *xs, layers, cos, sin), None

    (stream, state), _ = jax.lax.scan(body, (scheme.enter(x, cfg), state), (jnp.arange(cfg.num_hidden_layers), layers))
    return scheme.leave(stream), {"length": cache["length"] + n, **{k: state[k] for k in cached}}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def stateful_stack(x, state: State, layers, cos, sin, cfg, mesh: Mesh | None):
    """The layer scan of a scheme with carry state, with layer rematerialisation that saves
    only each layer's input X_l and the final state (memory O(L b s h) plus one state).

    Differentiating the plain scan would save the whole state at every layer (O(L^2 b s n hd)
    for stored Q/K). Here the backward scan re-runs layer l from X_l against the *final*
    state: every field is written once (`StateField.written_once`), so the slots layer l reads
    hold what it read in the forward pass, the slots it writes are rewritten by the layer
    itself, and slots written later enter with weight 0; the function, and its gradient, are
    those of the forward pass. Returns the last layer's stream.
    """
    return _stateful_forward(x, state, layers, cos, sin, cfg, mesh)[0]


def _stateful_step(cfg, mesh):
    return layer_body(cfg, attention_store(cfg, cfg.scheme), carry_fields(cfg), mesh)


def _stateful_forward(x, state: State, layers, cos, sin, cfg, mesh: Mesh | None):
    step = _stateful_step(cfg, mesh)

    def body(carry, xs):
        return step(carry, *xs, layers, cos, sin), carry[0]

    (x_out, state), inputs = jax.lax.scan(body, (x, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return x_out, (inputs, state, layers, cos, sin)


def _stateful_backward(cfg, mesh: Mesh | None, residuals, d_out):
    inputs, state, layers, cos, sin = residuals
    step = _stateful_step(cfg, mesh)

    def body(carry, xs):
        d_x, d_state, d_layers, d_cos, d_sin = carry
        layer, x, p = xs
        layer_fn = lambda x, state, p, layers, cos, sin: step((x, state), layer, p, layers, cos, sin)
        _, vjp = jax.vjp(layer_fn, x, state, p, layers, cos, sin)
        d_x, d_state, d_p, d_layers_l, d_cos_l, d_sin_l = vjp((d_x, d_state))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (d_x, d_state, add(d_layers, d_layers_l), d_cos + d_cos_l, d_sin + d_sin_l), d_p

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    carry = (d_out, zeros(state), zeros(layers), zeros(cos), zeros(sin))
    (d_x, d_state, d_layers, d_cos, d_sin), d_p = jax.lax.scan(
        body, carry, (jnp.arange(cfg.num_hidden_layers), inputs, layers), reverse=True)
    return d_x, d_state, jax.tree.map(jnp.add, d_layers, d_p), d_cos, d_sin


stateful_stack.defvjp(_stateful_forward, _stateful_backward)
