"""The protocol of a cross-layer connection, and the registry of the schemes that implement it.

A *family* is one kind of connection (connections/rerun.py, scores.py, values.py, dense.py,
streams.py): a subclass of `Connection` overriding the hooks where it departs from the standard
pre-norm layer (docs/maths.md B0). A *scheme*, what `ModelConfig.residual_method` names, is one
registered instance of a family with its rule functions. The layer (layer.py) calls the hooks of
its scheme in this order and never asks which family it is:

    y, write, state = connect("attention", X_l, state, ctx)   the sub-layer's input, and how its
        v, state = mix_values(v, state, ctx)                  output joins the stream (y is one
        heads = attend(q, k, v, state, ctx)                   [b, s, h] input, or one input per
    H_l = write(a_l)                                          projection: `ProjectionInputs`)
    y, write, state = connect("mlp", H_l, state, ctx)
    X_{l+1} = write(m_l)
    X_{l+1}, state = after_block(X_{l+1}, state, ctx)

and `enter` / `leave` for the stream entering layer 0 and leaving layer L-1. Its declarations:
`weights(cfg)` (learnable connection weights: float32, replicated, never weight-decayed, logged),
`state_fields(cfg)` (its fields of the layer scan's carry), `probs_state` (what it keeps of each
layer's attention in the "probs" attention state, stores.py), `flops(cfg, seq)` (its terms of
the FLOP counter), `cache_fields(cfg, batch, length, dtype)` (what decoding caches for it beyond
keys and values), `learned_matrix(params, cfg)` (its depth matrix, for the sweep's plots),
`observes_weights(cfg)` (whether its depth weights depend on the tokens: then its hooks `observe`
them when `ctx.record` is set, and the plots show their mean over validation tokens,
stack.observed_depth_weights, instead of `learned_matrix`), and `knobs` (the frozen dataclass of
its knobs: ModelConfig holds an instance, the command line and the sweep's METHOD:KNOB=VALUE
entries are generated from its fields).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual.params import LAYER_PARAMS

SUBLAYERS = ("attention", "mlp")
State = dict[str, jax.Array]
OBSERVED = "observed_depth_weights"  # the state entry of a recording pass (`observe`); never carried


@dataclasses.dataclass(frozen=True)
class Weight:
    """A learnable connection weight of every layer: `init(cfg)` -> float32 [L, ...], and the
    logical axis names of its trailing (per-layer) dimensions ("layers" is prepended).
    `init_std(cfg)`: where given, a normal draw of that standard deviation (from the model's
    init key) is added to `init(cfg)` (for a projection that must not start at 0)."""

    init: Callable[[Any], np.ndarray]
    axes: tuple[str, ...] = ("earlier_layers",)
    used: Callable[[Any], bool] | None = None  # used(cfg): whether the model has it (default: always)
    init_std: Callable[[Any], float] | None = None


class ProjectionInputs(NamedTuple):
    """What connect("attention") returns where a scheme feeds the attention's projections different
    inputs (MUDDFormer, DeepCrossAttention): q, k, v [b, s, h], each normalised by the layer's
    input_layernorm N1 and projected by its own W_q, W_k, W_v (docs/maths.md C5, C7). A plain
    [b, s, h] input is normalised once and feeds all three."""

    q: Any
    k: Any
    v: Any


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
class NoKnobs:
    """A scheme without knobs."""


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a hook sees of the layer it runs in: the (traced) layer index, this layer's params p,
    every layer's params stacked [L, ...] (to re-run earlier layers), the layer's input X_l, the
    config, the attention store (stores.py) and the mesh activations are constrained on."""

    index: Any
    params: dict
    layers: dict
    layer_input: Any
    cfg: Any
    memory: Any
    mesh: Any = None
    record: bool = False  # a recording pass (stack.observed_depth_weights): the hooks `observe`

    @property
    def first(self):
        """Whether this is layer 0, which attends and connects like the standard layer wherever
        a scheme reads earlier layers."""
        return self.index == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Connection:
    """The standard residual (docs/maths.md B0): every hook is the identity of the pre-norm layer.
    A family subclasses it; `name` is the scheme's `residual_method`, `weights` its learnable
    connection weights (name -> `Weight`, of which a config has `weights_for(cfg)`)."""

    name: str
    knobs: type = NoKnobs
    weights: dict = dataclasses.field(default_factory=dict)
    probs_state = None  # "probs" | "score_sum" | "scores": its stored attention (stores.py); None: none

    @property
    def stores_attention(self) -> bool:
        """Whether later layers read this layer's attention (the store writes it)."""
        return self.probs_state is not None

    # --- declarations

    def weights_for(self, cfg) -> dict[str, Weight]:
        """The learnable connection weights of a model with config `cfg`."""
        return {name: w for name, w in self.weights.items() if w.used is None or w.used(cfg)}

    def state_fields(self, cfg) -> dict[str, StateField]:
        return {}

    def check(self, cfg) -> list[str]:
        """Problems of a config with this scheme beyond its knobs' own checks (messages)."""
        return []

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Training FLOPs per token this scheme adds, by part (train/flops.py sums them)."""
        return {}

    def qk_rerun_flops(self, cfg, seq: int) -> float:
        """What re-running earlier layers from stored Q/K instead of stored P_i adds per token
        (docs/maths.md B4; methods 1-4); not part of `flops`, which counts the mathematics."""
        return 0.0

    def cache_fields(self, cfg, batch: int, length: int, dtype) -> State:
        """Decoding-cache arrays this scheme adds to the keys and values (stores.DecodeCache)."""
        return {}

    def learned_matrix(self, params: dict, cfg) -> np.ndarray | None:
        """Row l: the weights layer l gives the earlier layers (or blocks) under the scheme's
        rules, from one layer's params {name: [L, ...]}; None where they form no such matrix."""
        return None

    def observes_weights(self, cfg) -> bool:
        """Whether the depth weights depend on the tokens: the hooks then `observe` one row of
        them per sub-layer input they form (the same rows at every layer), and the plots show
        the mean over validation tokens (stack.observed_depth_weights) instead of `learned_matrix`."""
        return False

    # --- around the sub-layers

    def enter(self, x, cfg, mesh=None):
        """The residual stream entering layer 0 from the embeddings x [b, s, h]."""
        return x

    def leave(self, stream):
        """The last layer's output [b, s, h] from its stream."""
        return stream

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        """(the sub-layer's input [b, s, h], write(out) -> the stream after it, state)."""
        return stream, lambda out: stream + out, state

    def mix_values(self, v, state: State, ctx: LayerContext):
        """(the values the layer attends [b, s, nkv, hd], state)."""
        return v, state

    def attend(self, q, k, v, state: State, ctx: LayerContext):
        """The layer's attention heads [b, s, nh, hd] of q [b, s, nh, hd], k, v [b, s, nkv, hd]."""
        return ctx.memory.attend(state, ctx.index, q, k, v)

    def after_block(self, x, state: State, ctx: LayerContext):
        """(X_{l+1}, state) after the layer's MLP residual."""
        return x, state


def observe(state: State, ctx: LayerContext, row) -> State:
    """In a recording pass (ctx.record), `row` [S] (depth weights already averaged over batch
    and positions, float32) appended to the layer's observed rows [R, S]; else the state as is."""
    if not ctx.record:
        return state
    row = row.astype(jnp.float32)[None]
    rows = row if OBSERVED not in state else jnp.concatenate([state[OBSERVED], row])
    return {**state, OBSERVED: rows}


# ----------------------------------------------------------------------------- the registry

SCHEMES: dict[str, Connection] = {}


def register(scheme: Connection) -> Connection:
    """Add (or replace) a scheme. Its weights may not take the name of a layer parameter."""
    clash = LAYER_PARAMS.keys() & scheme.weights.keys()
    if clash:
        raise ValueError(f"{scheme.name}: weight names {sorted(clash)} are taken by the layer's own parameters")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_method(name: str) -> Connection:
    if name not in SCHEMES:
        raise ValueError(f"unknown residual method {name!r}; expected one of {list(SCHEMES)}")
    return SCHEMES[name]


def method_names() -> tuple[str, ...]:
    """Every registered scheme, in registration order (read at call time: the live registry)."""
    return tuple(SCHEMES)


def weight_names() -> frozenset[str]:
    """The names of every registered scheme's learnable connection weights (the live registry)."""
    return frozenset(name for scheme in SCHEMES.values() for name in scheme.weights)


def knob_fields() -> dict[str, dataclasses.Field]:
    """Every knob of every registered scheme: name -> its dataclass field (one per name: schemes
    sharing a knob share its declaration)."""
    return {f.name: f for scheme in SCHEMES.values() for f in dataclasses.fields(scheme.knobs)}


def knob_help(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def at_least(minimum: int, *names: str):
    """A knobs dataclass's __post_init__: each named knob >= minimum (None allowed where the
    knob's default is None)."""

    def check(knobs):
        defaults = {f.name: f.default for f in dataclasses.fields(knobs)}
        for name in names:
            value, optional = getattr(knobs, name), defaults[name] is None
            if not (value is None and optional) and (value is None or value < minimum):
                raise ValueError(f"{name} must be {'None or ' if optional else ''}>= {minimum}, got {value}")

    return check


def standard_scales(l, num_layers: int, head_dim: int):
    """sigma = e_l / sqrt(hd): the weights of ordinary attention over the stored scores [L]."""
    return jnp.where(jnp.arange(num_layers) == l, head_dim**-0.5, 0.0)
