"""The parameters of one decoder layer, in one table: their shapes, logical axes, initialisers and
the HF names they convert to. Everything that lists layer parameters reads `LAYER_PARAMS`.

Kernels are [in, out] (the transpose of torch's Linear.weight); the model stacks each over the
layers, [L, ...] with the logical axis "layers" first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class LayerParam:
    """shape(cfg) -> the per-layer shape; axes: its logical axis names; init: "normal" (the
    config's initializer_range) or "ones"; hf_key: its key under `model.layers.{l}.`; transposed:
    whether HF stores it as [out, in]; rerun: whether re-running the layer on a new input reads
    it (docs/maths.md B1: everything but Q and K, which come from the stored attention)."""

    shape: Callable
    axes: tuple[str, ...]
    init: str
    hf_key: str
    transposed: bool
    rerun: bool = True


def _q_dim(cfg) -> int:
    return cfg.num_attention_heads * cfg.head_dim


def _kv_dim(cfg) -> int:
    return cfg.num_key_value_heads * cfg.head_dim


LAYER_PARAMS: dict[str, LayerParam] = {
    "input_layernorm": LayerParam(lambda c: (c.hidden_size,), ("norm",), "ones", "input_layernorm.weight", False),
    "q_proj": LayerParam(lambda c: (c.hidden_size, _q_dim(c)), ("embed", "heads"), "normal",
                         "self_attn.q_proj.weight", True, rerun=False),
    "k_proj": LayerParam(lambda c: (c.hidden_size, _kv_dim(c)), ("embed", "kv"), "normal",
                         "self_attn.k_proj.weight", True, rerun=False),
    "v_proj": LayerParam(lambda c: (c.hidden_size, _kv_dim(c)), ("embed", "kv"), "normal",
                         "self_attn.v_proj.weight", True),
    "o_proj": LayerParam(lambda c: (_q_dim(c), c.hidden_size), ("heads", "embed"), "normal",
                         "self_attn.o_proj.weight", True),
    "post_attention_layernorm": LayerParam(lambda c: (c.hidden_size,), ("norm",), "ones",
                                           "post_attention_layernorm.weight", False),
    "gate_proj": LayerParam(lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal",
                            "mlp.gate_proj.weight", True),
    "up_proj": LayerParam(lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal",
                          "mlp.up_proj.weight", True),
    "down_proj": LayerParam(lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal",
                            "mlp.down_proj.weight", True),
}
RERUN_PARAM_NAMES = tuple(name for name, param in LAYER_PARAMS.items() if param.rerun)


def initializer(param: LayerParam, cfg):
    """The flax initializer of a layer parameter."""
    return nn.initializers.ones if param.init == "ones" else nn.initializers.normal(cfg.initializer_range)
