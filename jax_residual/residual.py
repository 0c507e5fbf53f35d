"""The residual methods of docs/maths.md B (and the schemes of C), as records in one registry.

A method differs from the standard layer in a few places, and its record names exactly those:

* `recompute` — which output of the earlier layers is re-run on the current input X_l with
  their stored attention, and which residual it replaces (methods 1-4):
    "attention":  H_l = a_l + sum_{i<l} w_{l,i} A~_i(X_l)
    "mlp":        X_{l+1} = m_l + sum_{i<l} w_{l,i} M~_i(X_l)
* `earlier_weights(l, rerun, p) -> w [L]` — the weights w_{l,i} of that sum over the re-run
  layers `rerun` (boolean [L]: i < l, narrowed by the `rerun_window` / `rerun_every` knobs, see
  `rerun_layers`), zero elsewhere.
* `score_scales(l, p, L, hd) -> sigma [L]` — method 5: the attention scores of layer l are
  sum_i sigma_{l,i} S_i with S_i = Q_i K_i^T, zero for i > l (standard: sigma = e_l / sqrt(hd)).
* `mix_values(v, first_values, p) -> v'` — the values of layers l >= 1 mixed with layer 0's
  (value residual).
* `mix_blocks(l, p, cfg) -> alpha [L+1]` — the next layer's input is sum_j alpha_j Z_j over the
  embeddings Z_0 and the block outputs Z_{j+1} = Y_j so far, alpha_j = 0 for j > l + 1 (DenseFormer).
* `streams` — the residual stream is n copies wide, each sub-layer reads and writes it through
  its own connection (hyper-connections); the model's output is the mean of the n streams.
* `weights` — the learnable connection weights it adds: name -> `Weight` (initial value [L, ...]
  from the model config, logical axes, and whether a config uses it: `weights_for(cfg)`). They
  stay float32, are never weight-decayed, are replicated and are logged; all of this is decided from the live registry, so a method registered later gets it.
* `state(cfg)` — the fields it adds to the layer scan's carry (`StateField`s: shape, logical
  axes, initial value), derived from the rules above unless given.
* `extra_flops(cfg, seq) -> float` — training FLOPs per token its connections add beyond the
  rules counted in `train/flops.py` (re-runs and summed scores are counted there).

`l` is the (traced) layer index, `p` the layer's own parameters. Layer 0 has nothing earlier:
the model gives it the standard residual, attention and values, so those rules only describe
l >= 1 (block mixing and streams apply at every layer, layer 0 included).
Adding a method = one rule function (if the existing ones do not fit) and one `register(...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SUBLAYERS = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class Weight:
    """A learnable connection weight of every layer: `init(cfg)` -> float32 [L, ...], and the
    logical axis names of its trailing (per-layer) dimensions ("layers" is prepended)."""

    init: Callable[[Any], np.ndarray]
    axes: tuple[str, ...] = ("earlier_layers",)
    used: Callable[[Any], bool] | None = None  # used(cfg): whether the model has it (default: always)


@dataclasses.dataclass(frozen=True)
class StateField:
    """One field of the layer scan's carry.

    shape(cfg, batch, seq) -> its shape; axes: one logical name per dimension (for sharding
    constraints); initial(x, zeros) -> its value before layer 0 from the embeddings x [b, s, h]
    (default: the zeros). `written_once`: every layer l writes only slots it alone owns and
    reads only slots written at layers <= l, so layer l re-run against the FINAL carry sees what
    it saw in the forward pass (what `remat="layer"` relies on). `final_only`: too large to be
    saved at every layer (the scan's autodiff would keep L copies): the stack keeps only the
    final carry (the `remat="layer"` custom VJP) whatever `remat` says; needs `written_once`.
    """

    shape: Callable[[Any, int, int], tuple[int, ...]]
    axes: tuple[str, ...]
    initial: Callable | None = None
    dtype: str = "compute"  # "compute" (the model's dtype) or "float32"
    written_once: bool = True
    final_only: bool = False

    def __post_init__(self):
        if self.final_only and not self.written_once:
            raise ValueError("a final_only state field must be written once")


@dataclasses.dataclass(frozen=True)
class Streams:
    """An n-wide residual stream H [n, b, s, h] (hyper-connections).

    count(cfg) -> n. connect(H, sublayer, p, cfg) -> (y [b, s, h], write): y is the sub-layer's
    input and write(out [b, s, h]) -> H' merges its output into the streams. The embeddings
    enter as n copies and the model's output is the mean of the last layer's n streams (the
    paper sums them; the mean is the same up to the final RMSNorm's scale invariance, and makes
    the Pre-Norm-equivalent initialisation equal the standard model exactly, see peers.py).
    """

    count: Callable[[Any], int]
    connect: Callable


@dataclasses.dataclass(frozen=True)
class ResidualMethod:
    name: str
    recompute: str | None = None  # None | "attention" | "mlp"
    earlier_weights: Callable | None = None
    score_scales: Callable | None = None
    mix_values: Callable | None = None
    uniform_scores: bool = False  # score_scales gives every i <= l the same sigma_l (5.1-5.4)
    mix_blocks: Callable | None = None
    streams: Streams | None = None
    weights: dict[str, Weight] = dataclasses.field(default_factory=dict)
    state: Callable[[Any], dict[str, StateField]] | None = None
    extra_flops: Callable[[Any, int], float] | None = None
    knobs: tuple[str, ...] = ()  # the ModelConfig scheme knobs it reads (config.SCHEME_KNOBS)

    def __post_init__(self):
        if self.recompute not in (None, *SUBLAYERS):
            raise ValueError(f"{self.name}: recompute must be None or one of {SUBLAYERS}, got {self.recompute!r}")
        if (self.recompute is None) != (self.earlier_weights is None):
            raise ValueError(f"{self.name}: recompute and earlier_weights go together")

    def weights_for(self, cfg) -> dict[str, Weight]:
        """The learnable connection weights of a model with config `cfg`."""
        return {name: w for name, w in self.weights.items() if w.used is None or w.used(cfg)}

    @property
    def stores_attention(self) -> bool:
        """Whether later layers read this layer's attention (methods 1-5)."""
        return self.recompute is not None or self.score_scales is not None

    def state_fields(self, cfg) -> dict[str, StateField]:
        """The carry fields this method adds (empty for the standard layer)."""
        if self.state is not None:
            return self.state(cfg)
        fields = {}
        if self.stores_attention:
            fields.update(stored_attention_fields(cfg, self))
        if self.mix_values is not None:
            fields["first_values"] = StateField(lambda c, b, s: (b, s, c.num_key_value_heads, c.head_dim),
                                                ("batch", "seq", "kv_heads", "head_dim"))
        if self.mix_blocks is not None:
            fields["block_outputs"] = StateField(lambda c, b, s: (c.num_hidden_layers + 1, b, s, c.hidden_size),
                                                 ("layers", "batch", "seq", "embed"),
                                                 initial=lambda x, zeros: zeros.at[0].set(x))
        return fields


def stored_attention_fields(cfg, method: ResidualMethod) -> dict[str, StateField]:
    """What layer l keeps of its attention for the later layers, by `cfg.attention_state`
    (resolved to "qk" or "probs", see `ModelConfig.with_attention_state`):

    "qk": post-RoPE queries stored_q [L, b, s, nh, hd] and keys stored_k [L, b, s, nkv, hd];
        P_i = softmax(Q_i K_i^T / sqrt(hd) + mask) and the scores S_i are recomputed from
        them (docs/maths.md B4). O(L b s h).
    "probs": methods 1-4 keep P_i itself, stored_probs [L, b, nh, s, s] (the model's dtype);
        method 5 with uniform scales keeps the running raw-score sum score_sum = sum_{i<=l} S_i
        [b, nh, s, s] float32 (one layer's worth, accumulated: not written once), other
        score weights (5.5) every layer's raw scores stored_scores [L, b, nh, s, s] float32.
        The [L, ...] stacks are `final_only`.
    """
    L, nh, nkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.attention_state == "qk":
        return {
            "stored_q": StateField(lambda c, b, s: (L, b, s, nh, hd), ("layers", "batch", "seq", "heads", "head_dim")),
            "stored_k": StateField(lambda c, b, s: (L, b, s, nkv, hd), ("layers", "batch", "seq", "kv_heads", "head_dim")),
        }
    if cfg.attention_state != "probs":
        raise ValueError(f"attention_state {cfg.attention_state!r} is not resolved; use ModelConfig.with_attention_state")
    per_layer = lambda c, b, s: (L, b, nh, s, s)
    axes = ("layers", "batch", "heads", "seq", "kv_seq")  # kv_seq: no sharding rule (replicated)
    if method.score_scales is None:
        return {"stored_probs": StateField(per_layer, axes, final_only=True)}
    if method.uniform_scores:
        return {"score_sum": StateField(lambda c, b, s: (b, nh, s, s), axes[1:], dtype="float32", written_once=False)}
    return {"stored_scores": StateField(per_layer, axes, dtype="float32", final_only=True)}


METHODS: dict[str, ResidualMethod] = {}
LAYER_PARAM_NAMES = frozenset({"input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                               "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"})


def register(method: ResidualMethod) -> ResidualMethod:
    """Add (or replace) a method. Its weights may not take the name of a layer parameter."""
    clash = LAYER_PARAM_NAMES & method.weights.keys()
    if clash:
        raise ValueError(f"{method.name}: weight names {sorted(clash)} are taken by the layer's own parameters")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ResidualMethod:
    if name not in METHODS:
        raise ValueError(f"unknown residual method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (read at call time: the live registry)."""
    return tuple(METHODS)


def weight_names() -> frozenset[str]:
    """The names of every registered method's learnable connection weights (the live registry)."""
    return frozenset(name for method in METHODS.values() for name in method.weights)


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


def _zeros_per_earlier_layer(cfg):
    return np.zeros((cfg.num_hidden_layers, cfg.num_hidden_layers), np.float32)


def _half_exponents(cfg):
    return np.full((cfg.num_hidden_layers, 2), 0.5, np.float32)


def _inverse_sqrt_depth(cfg):
    """c_{l,i} = 1/sqrt(l + 1), so 5.5 starts equal to 5.2."""
    L = cfg.num_hidden_layers
    return np.repeat(1.0 / np.sqrt(np.arange(1, L + 1, dtype=np.float32))[:, None], L, 1)


# ----------------------------------------------------------------------------- the registry

ALPHA = {"residual_weight_logits": Weight(_zeros_per_earlier_layer)}
register(ResidualMethod("standard"))
register(ResidualMethod("method1", recompute="mlp", earlier_weights=sum_of_earlier))
register(ResidualMethod("method2", recompute="attention", earlier_weights=sum_of_earlier))
register(ResidualMethod("method3.1", recompute="mlp", earlier_weights=mean_of_earlier))
register(ResidualMethod("method3.2", recompute="mlp", earlier_weights=softmax_of_earlier, weights=ALPHA))
register(ResidualMethod("method4.1", recompute="attention", earlier_weights=mean_of_earlier))
register(ResidualMethod("method4.2", recompute="attention", earlier_weights=softmax_of_earlier, weights=ALPHA))
register(ResidualMethod("method5.1", uniform_scores=True, score_scales=_uniform_scales(lambda m, hd, p: hd**0.5)))
register(ResidualMethod("method5.2", uniform_scores=True, score_scales=_uniform_scales(lambda m, hd, p: hd**0.5 * jnp.sqrt(m))))
register(ResidualMethod("method5.3", uniform_scores=True, score_scales=_uniform_scales(lambda m, hd, p: hd**0.5 * m)))
register(ResidualMethod(
    "method5.4",
    uniform_scores=True,
    score_scales=_uniform_scales(lambda m, hd, p: hd ** p["score_exponents"][0] * m ** p["score_exponents"][1]),
    weights={"score_exponents": Weight(_half_exponents, ("exponents",))},
))
register(ResidualMethod("method5.5", score_scales=learned_score_weights,
                        weights={"score_weights": Weight(_inverse_sqrt_depth)}))

METHOD_NAMES = method_names()  # the twelve methods of docs/maths.md B, fixed; method_names() is the live registry
