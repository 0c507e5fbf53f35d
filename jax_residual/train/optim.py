"""The optimiser: AdamW with linear warmup + cosine decay and global-norm clipping, in groups.

Parameter groups (`param_group`):
  "matrix": projections, embedding, LM head — AdamW with weight decay;
  "norm":   RMSNorm scales — no weight decay;
  "method": the residual methods' learnable connection weights (`residual.weight_names()`, read
            from the live registry at each call) — their own group, no weight decay (decay would
            pull the connection weights towards zero).
"""

from __future__ import annotations

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


def learning_rate(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine to FINAL_LR_FRACTION * peak at total_steps."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, peak * FINAL_LR_FRACTION)


def make_optimizer(peak_lr: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip), then AdamW per group (weight decay on "matrix" only)."""
    schedule = learning_rate(peak_lr, warmup_steps, total_steps)
    decay = {"matrix": weight_decay, "norm": 0.0, "method": 0.0}
    groups = {name: optax.adamw(schedule, *BETAS, weight_decay=wd) for name, wd in decay.items()}
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.multi_transform(groups, param_labels))
