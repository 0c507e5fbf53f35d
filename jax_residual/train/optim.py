"""The optimiser: AdamW with linear warmup + cosine decay and global-norm clipping, in groups.

Parameter groups (`param_group`):
  "matrix": projections, embedding, LM head — AdamW with weight decay;
  "norm":   RMSNorm scales — no weight decay;
  "method": the residual methods' learnable connection weights (`residual.weight_names()`, read
            from the live registry at each call) — their own group, no weight decay (decay would
            pull the connection weights towards zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util

from jax_residual.connections import weight_names

BETAS = (0.9, 0.95)
FINAL_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak learning rate


def key_names(path) -> tuple[str, ...]:
    """A pytree key path as plain strings: ('layers', 'q_proj')."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_group(path) -> str:
    """'method', 'norm' or 'matrix' for a parameter's key path."""
    names = key_names(path)
    if weight_names() & set(names):
        return "method"
    if any("norm" in name for name in names):
        return "norm"
    return "matrix"


def param_labels(params):
    """The params tree with each leaf replaced by its group name."""
    return tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def warmup_cosine(count, peak, warmup_steps, total_steps):
    """The learning rate at step `count`: 0 -> peak linearly over warmup_steps, then a cosine to
    FINAL_LR_FRACTION * peak at total_steps and flat after (optax.warmup_cosine_decay_schedule's
    values). Every argument may be a traced value: the schedule's settings are optimiser state."""
    count = jnp.asarray(count, jnp.float32)
    warming = peak * (count / jnp.maximum(warmup_steps, 1))
    decay_steps = total_steps - warmup_steps
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count - warmup_steps, decay_steps) / decay_steps))
    decaying = peak * ((1 - FINAL_LR_FRACTION) * cosine + FINAL_LR_FRACTION)
    return jnp.where(count < warmup_steps, warming, decaying)


def learning_rate(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The schedule of `warmup_cosine` with these settings (step -> learning rate)."""
    return functools.partial(warmup_cosine, peak=peak, warmup_steps=warmup_steps, total_steps=total_steps)


def scale_by_warmup_cosine(peak_lr, warmup_steps, total_steps) -> optax.GradientTransformation:
    """updates x -warmup_cosine(step): optax.scale_by_learning_rate of that schedule."""
    return optax.scale_by_schedule(lambda count: -warmup_cosine(count, peak_lr, warmup_steps, total_steps))


def make_optimizer(peak_lr: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip), then AdamW per group (weight decay on "matrix" only): Adam's
    update plus the decay per group, times the scheduled rate. The schedule's settings are state
    (optax.inject_hyperparams), not constants of the program: runs that differ in learning rate
    or steps share the compiled train step (`with_schedule` sets them)."""
    decay = {"matrix": weight_decay, "norm": 0.0, "method": 0.0}
    groups = {name: optax.chain(optax.scale_by_adam(*BETAS), optax.add_decayed_weights(wd)) for name, wd in decay.items()}
    schedule = optax.inject_hyperparams(scale_by_warmup_cosine)(peak_lr, warmup_steps, total_steps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.multi_transform(groups, param_labels), schedule)


def with_schedule(opt_state, peak_lr: float, warmup_steps: int, total_steps: int):
    """make_optimizer's state with the schedule's settings replaced by these (each array keeps its
    dtype and placement): a fresh or restored state takes the run's learning rate and steps."""
    *others, schedule = opt_state
    values = {"peak_lr": peak_lr, "warmup_steps": warmup_steps, "total_steps": total_steps}
    hyperparams = {name: jax.make_array_from_callback(array.shape, array.sharding,  # every process's devices
                                                      lambda index, v=np.asarray(values[name], array.dtype): v[index])
                   for name, array in schedule.hyperparams.items()}
    return (*others, schedule._replace(hyperparams=hyperparams))
