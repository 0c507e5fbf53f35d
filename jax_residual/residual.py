"""The residual methods of SPEC.md Part B, as small records in one registry.

A method differs from the standard layer in at most three places, and its record names them:

* `recompute` — which output of the earlier layers is re-run on the current input X_l with their
  stored attention, and which residual it replaces:
    "attention":  H_l = a_l + sum_{i<l} w_{l,i} A~_i(X_l)          (methods 2, 4.x)
    "mlp":        X_{l+1} = m_l + sum_{i<l} w_{l,i} M~_i(X_l)      (methods 1, 3.x)
* `earlier_weights(l, rerun, p) -> w [L]` — the weights w_{l,i} of that sum over the re-run
  layers `rerun` (boolean [L]: i < l, narrowed by the optional `rerun_window` / `rerun_every`
  knobs of the config, see `rerun_layers`), zero elsewhere.
* `score_scales(l, p, L, hd) -> sigma [L]` — method 5: the attention scores of layer l are
  sum_i sigma_{l,i} S_i with S_i = Q_i K_i^T, zero for i > l (standard: sigma = e_l / sqrt(hd)).
* `params` — the learnable per-layer parameters it adds (name -> initial value [L, ...]).

`l` is the (traced) layer index, `p` the layer's own parameters. A layer that re-runs no
earlier layer (layer 0 always) keeps the standard residual, and layer 0's attention is always
standard; the model enforces both, so the rules only describe l >= 1. Adding a method = one rule
function (if the existing ones do not fit) and one `register(...)` line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ResidualMethod:
    name: str
    recompute: str | None = None  # None | "attention" | "mlp"
    earlier_weights: Callable | None = None
    score_scales: Callable | None = None
    params: dict[str, Callable[[int], np.ndarray]] = dataclasses.field(default_factory=dict)


METHODS: dict[str, ResidualMethod] = {}


def register(method: ResidualMethod) -> ResidualMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ResidualMethod:
    if name not in METHODS:
        raise ValueError(f"unknown residual method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


# ----------------------------------------------------------------------------- weights w_{l,i}


def rerun_layers(l, num_layers: int, window: int | None = None, every: int = 1):
    """Boolean [L]: the earlier layers i < l that layer l re-runs. All of them by default;
    `window` keeps the last `window` (i >= l - window), `every` keeps i = 0, p, 2p, ..."""
    i = jnp.arange(num_layers)
    rerun = (i < l) & (i % every == 0)
    return rerun if window is None else rerun & (i >= l - window)


def rerun_pair_count(num_layers: int, window: int | None = None, every: int = 1) -> int:
    """How many (layer l, earlier layer i) re-runs one forward pass makes: sum_l |rerun_layers(l)|."""
    return int(sum(jnp.sum(rerun_layers(l, num_layers, window, every)) for l in range(num_layers)))


def sum_of_earlier(l, rerun, p):
    """w_{l,i} = 1: the plain sum (methods 1, 2)."""
    return rerun.astype(jnp.float32)


def mean_of_earlier(l, rerun, p):
    """w_{l,i} = 1/l (1/#re-run layers): the average (methods 3.1, 4.1)."""
    return sum_of_earlier(l, rerun, p) / jnp.maximum(jnp.sum(rerun), 1)


def softmax_of_earlier(l, rerun, p):
    """w_{l,.} = softmax(alpha_{l,.}) over the re-run layers, alpha learnable (methods 3.2, 4.2)."""
    logits = jnp.where(rerun, p["residual_weight_logits"].astype(jnp.float32), -jnp.inf)
    return jnp.where(rerun, jax.nn.softmax(logits, where=rerun), 0.0)


# ----------------------------------------------------------------------------- scores sigma_{l,i}


def _summed(l, num_layers):
    """Boolean [L]: i <= l, and m = l + 1, the number of summed score matrices."""
    return jnp.arange(num_layers) <= l, (l + 1).astype(jnp.float32)


def standard_scales(l, p, num_layers, head_dim):
    """sigma = e_l / sqrt(hd): ordinary attention of layer l alone."""
    return jnp.where(jnp.arange(num_layers) == l, head_dim**-0.5, 0.0)


def _uniform_scales(divisor):
    """sigma_{l,i} = 1 / d_s(m, hd) for every i <= l."""

    def scales(l, p, num_layers, head_dim):
        summed, m = _summed(l, num_layers)
        return jnp.where(summed, 1.0 / divisor(m, head_dim, p), 0.0)

    return scales


def learned_score_weights(l, p, num_layers, head_dim):
    """sigma_{l,i} = c_{l,i} / sqrt(hd), c learnable (method 5.5)."""
    summed, _ = _summed(l, num_layers)
    return jnp.where(summed, p["score_weights"].astype(jnp.float32) * head_dim**-0.5, 0.0)


# ----------------------------------------------------------------------------- initial values


def _zeros_per_earlier_layer(num_layers):
    return np.zeros((num_layers, num_layers), np.float32)


def _half_exponents(num_layers):
    return np.full((num_layers, 2), 0.5, np.float32)


def _inverse_sqrt_depth(num_layers):
    """c_{l,i} = 1/sqrt(l + 1), so 5.5 starts equal to 5.2."""
    return np.repeat(1.0 / np.sqrt(np.arange(1, num_layers + 1, dtype=np.float32))[:, None], num_layers, 1)


# ----------------------------------------------------------------------------- the registry

register(ResidualMethod("standard"))
register(ResidualMethod("method1", recompute="mlp", earlier_weights=sum_of_earlier))
register(ResidualMethod("method2", recompute="attention", earlier_weights=sum_of_earlier))
register(ResidualMethod("method3.1", recompute="mlp", earlier_weights=mean_of_earlier))
register(ResidualMethod("method3.2", recompute="mlp", earlier_weights=softmax_of_earlier,
                        params={"residual_weight_logits": _zeros_per_earlier_layer}))
register(ResidualMethod("method4.1", recompute="attention", earlier_weights=mean_of_earlier))
register(ResidualMethod("method4.2", recompute="attention", earlier_weights=softmax_of_earlier,
                        params={"residual_weight_logits": _zeros_per_earlier_layer}))
register(ResidualMethod("method5.1", score_scales=_uniform_scales(lambda m, hd, p: hd**0.5)))
register(ResidualMethod("method5.2", score_scales=_uniform_scales(lambda m, hd, p: hd**0.5 * jnp.sqrt(m))))
register(ResidualMethod("method5.3", score_scales=_uniform_scales(lambda m, hd, p: hd**0.5 * m)))
register(ResidualMethod(
    "method5.4",
    score_scales=_uniform_scales(lambda m, hd, p: hd ** p["score_exponents"][0] * m ** p["score_exponents"][1]),
    params={"score_exponents": _half_exponents},
))
register(ResidualMethod("method5.5", score_scales=learned_score_weights,
                        params={"score_weights": _inverse_sqrt_depth}))

METHOD_NAMES = tuple(METHODS)
METHOD_PARAM_NAMES = frozenset(name for m in METHODS.values() for name in m.params)
