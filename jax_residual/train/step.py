"""The train state, its shardings, and the jitted init / train / eval steps.

Every array has an explicit sharding: params from the logical-axis rules (sharding.py),
optimiser moments exactly like the params they track, the step counter and the metrics
replicated, token batches split along the batch over data (and fsdp). The train step is ONE
`jax.jit` with in_shardings/out_shardings that donates the old state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_residual import LlamaForCausalLM, ModelConfig, sharding
from jax_residual.train.optim import key_names


@flax.struct.dataclass
class TrainState:
    """step: int32 [] (optimiser updates done); params: the model's param tree; opt_state: optax's."""

    step: jax.Array
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- loss


def token_losses(params, model: nn.Module, tokens):
    """float32 [b, s]: entry [r, t] is the cross-entropy of predicting tokens[r, t + 1] from
    tokens[r, :t + 1]; tokens int32 [b, s + 1]. Depends on no token after t + 1."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def next_token_loss(params, model: nn.Module, tokens):
    """Mean of `token_losses` over batch and positions: a scalar; tokens int32 [b, s + 1]."""
    return token_losses(params, model, tokens).mean()


def loss_and_grads(params, model: nn.Module, batch):
    """(loss, grads) of batch int32 [accum, b / accum, s + 1]: the mean `next_token_loss` of the
    `accum` micro-batches and the mean of their parameter gradients (one micro-batch at a time,
    a scan). The micro-batches are equal in size, so both equal those of the whole batch up to
    summation order."""

    def accumulate(grad_sum, tokens):
        loss, grads = jax.value_and_grad(next_token_loss)(params, model, tokens)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    grad_sum, losses = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
    return losses.mean(), jax.tree.map(lambda g: g / batch.shape[0], grad_sum)


# ----------------------------------------------------------------------------- shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[n, b, s] stacks of token batches (micro-batches, eval batches): b split like a batch."""
    return NamedSharding(mesh, PartitionSpec(None, *sharding.batch_sharding(mesh).spec))


def abstract_variables(cfg: ModelConfig, seq_len: int):
    """Shapes of the model's (boxed, logically annotated) variables, computed without FLOPs."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), ids)


def like_params(tree, param_shardings, default):
    """For each leaf of `tree` (e.g. an optimiser state): the sharding of the parameter whose key
    path is the longest suffix of the leaf's path (Adam's mu/nu of layers/q_proj -> q_proj's
    sharding), else `default` (counters, scalars)."""
    by_path = {key_names(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def pick(path, _):
        names = key_names(path)
        suffixes = (names[start:] for start in range(len(names)))
        return next((by_path[s] for s in suffixes if s in by_path), default)

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(mesh: Mesh, cfg: ModelConfig, tx: optax.GradientTransformation, seq_len: int):
    """(TrainState of NamedShardings, TrainState of ShapeDtypeStructs carrying those shardings)."""
    variables = abstract_variables(cfg, seq_len)
    param_shardings = sharding.param_shardings(mesh, variables)["params"]
    params = nn.meta.unbox(variables)["params"]
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    shardings = TrainState(replicated(mesh), param_shardings,
                           like_params(shapes.opt_state, param_shardings, replicated(mesh)))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return shardings, abstract


# ----------------------------------------------------------------------------- init


def make_init_params(cfg: ModelConfig, seq_len: int, param_shardings):
    """jit(key) -> random params, created sharded (out_shardings). The mesh-free model
    initialises them, so the values are the same whatever the mesh (a vocabulary-parallel
    embedding would draw its table per shard)."""
    model = LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(lambda key: nn.meta.unbox(model.init(key, ids))["params"], out_shardings=param_shardings)


def init_params(cfg: ModelConfig, seed: int, seq_len: int, param_shardings):
    """Random params of `seed` (make_init_params)."""
    return make_init_params(cfg, seq_len, param_shardings)(jax.random.key(seed))


def place_params(host_params, param_shardings):
    """Host (numpy) params -> float32 global arrays with these shardings (every process holds
    the full values and places its own shards)."""
    def place(value, target):
        value = np.asarray(value, np.float32)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(place, host_params, param_shardings)


def make_init_state(tx: optax.GradientTransformation, shardings: TrainState):
    """jit(params) -> step 0 and fresh optimiser state, created directly in `shardings`."""
    return jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                   in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)


def init_state(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """Step 0 and fresh optimiser state for params (make_init_state)."""
    return make_init_state(tx, shardings)(params)


# ----------------------------------------------------------------------------- steps


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, mesh: Mesh):
    """jit(state, batch int32 [accum, b/accum, s+1]) -> (state, {"loss", "grad_norm", "param_norm"}).

    ONE optimiser update with the gradients of `loss_and_grads` (averaged over the `accum`
    micro-batches), so the result equals one step on the whole batch up to summation order.
    """

    def train_step(state: TrainState, batch):
        loss, grads = loss_and_grads(state.params, model, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(train_step, in_shardings=(shardings, stacked_batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(model: nn.Module, param_shardings, mesh: Mesh):
    """jit(params, batches int32 [n, b, s+1]) -> mean over the n batches of the mean loss."""

    def evaluate(params, batches):
        return jax.lax.map(lambda tokens: next_token_loss(params, model, tokens), batches).mean()

    return jax.jit(evaluate, in_shardings=(param_shardings, stacked_batch_sharding(mesh)),
                   out_shardings=replicated(mesh))


def make_depth_weights_step(model: nn.Module, param_shardings, mesh: Mesh):
    """jit(params, batches int32 [n, b, s+1]) -> float32 [L R, S]: the scheme's input-dependent
    depth weights averaged over the tokens the evaluation reads (the n batches are equal in
    size: the mean of their means). A function of its own: evaluation cadence only, never
    compiled into the training step. See LlamaForCausalLM.observed_depth_weights."""

    def observe(params, batches):
        weights = lambda tokens: model.apply({"params": params}, tokens[:, :-1],
                                             method=LlamaForCausalLM.observed_depth_weights)
        return jax.lax.map(weights, batches).mean(axis=0)

    return jax.jit(observe, in_shardings=(param_shardings, stacked_batch_sharding(mesh)),
                   out_shardings=replicated(mesh))
