"""ModelConfig: a frozen dataclass with HuggingFace `LlamaConfig` field names plus the residual
method and its knobs (the knobs dataclass its scheme declares, connections/)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax_residual.connections import SCHEMES, knob_fields

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "recompute", "layer")
ATTENTION_STATES = ("auto", "qk", "probs")
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "tie_word_embeddings", "initializer_range")


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama decoder hyper-parameters (HF names) and the residual method.

    rope_ntk_ratio: NTK-aware RoPE ratio k (1 = plain Llama RoPE).
    rope_dynamic_ntk: a sequence longer than max_position_embeddings * k takes the smallest even
        k' that covers it (docs/maths.md A4) instead of raising.
    dtype: compute dtype (params stay float32). With "bfloat16" activations and matmul operands
        are bf16; norm statistics, softmax, method 5's score sum and the connection weights
        stay float32.
    remat: how the backward pass gets its activations.
        "recompute" (default): the re-run of earlier layers (methods 1-4) is checkpointed, so
            it keeps no per-earlier-layer activations; the layer scan still saves its carry,
            the stored Q/K, at every layer: memory grows ~L^2 in depth.
        "layer": each layer is re-run in the backward pass from its saved input X_l, against
            the final stored Q/K (a custom VJP around the scan for the look-back methods; no
            forward-mode autodiff there): memory linear in depth, at about the time of "recompute".
        "none": saves every intermediate, the per-pair re-run activations included (the most
            memory). Measured trade-offs: benchmarks/README.md (remat).
        With attention_state "probs" the [L, ...] probability / score stacks (methods 1-4, 5.5)
        always take the "layer" custom VJP; 5.1-5.4's running score sum is accumulated (not
        written once), so "layer" checkpoints the plain scan's body there instead.
    attention_block_size: queries are processed in causal blocks of this many (block j reads
        only keys up to its end): ~half the s x s scores are skipped and attention memory is
        O(block * s). None = one dense block. Up to 16 blocks are unrolled (s <= 1024 at 64);
        up to 4x longer sequences grow the block to stay unrolled (s <= 4096 at 64 takes blocks
        of s / 16: `functional.query_block`); longer ones scan over the blocks against all keys
        (constant HLO, 2x the causal FLOPs). The default 64 keeps s = 1024 unrolled
        (benchmarks/README.md, chunks section).
    recompute_chunk_size: earlier layers are re-run in chunks of this many layers (one
        attention call and one V einsum per chunk), a chunk being skipped entirely when none of
        its layers is re-run. Must divide the number of candidate layers (L, or
        ceil(L / rerun_every)); L = one batched call per layer over all earlier layers. Default
        1: layer l then re-runs exactly its l earlier layers, where chunks of C re-run
        ceil(l / C) * C of them (at L = 8, chunks of 4 do 40 layer re-runs for 28 needed).
        Chosen by measurement: benchmarks/README.md (chunks section; `bench_methods.py
        --sections chunks` measures another machine).
    knobs: the scheme's knobs, an instance of the knobs dataclass its family declares (e.g.
        `RerunKnobs(rerun_window, rerun_every, rerun_keep_identity)` of methods 1-4, `DenseKnobs(dense_dilation,
        dense_period)`, `HCKnobs(hc_expansion, hc_dynamic)`), or a mapping of knob names to
        values (None: the defaults); each knob's meaning is in its dataclass. A knob the scheme
        does not read is an error naming the knobs it has. `replace(residual_method=...)` carries
        the knobs set away from their defaults over (an error where the new scheme lacks one).
    attention_state: what methods 1-5 keep of each layer's attention for the later layers
        (stores.py); the same function in every mode.
        "qk": post-RoPE Q and K, O(L b s h): linear in s; each re-run recomputes Q K^T and
            the softmax (docs/maths.md B4).
        "probs": what torch_ref keeps: P_i for methods 1-4, the running raw-score sum for
            uniformly scaled method 5 (5.1-5.4), every layer's raw scores where the weights
            differ per layer (5.5): O(L b nh s^2); a re-run is one P_i V product.
        "auto" (default): "probs" for the methods whose "probs" state is one running sum
            (5.1-5.4) when `probs_state_bytes` (L b nh s^2 float32: the per-layer
            probabilities the backward keeps) is at most `attention_state_budget_bytes`, else
            "qk"; decided when the model is traced, from its batch and sequence length. The
            [L, b, nh, s, s] stacks of methods 1-4 and 5.5 measured slower than "qk" on CPU
            (their written-once custom VJP moves a full-size cotangent per layer;
            benchmarks/README.md), so "auto" keeps "qk" for them: ask for "probs" explicitly.
    attention_state_budget_bytes: the "auto" budget, default 1 GiB (b8 s256 and b2 s1024 at
        8 layers x 8 heads fit, s >= 4096 at batch 1 does not).
    """

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    residual_method: str = "standard"
    rope_ntk_ratio: float = 1.0
    rope_dynamic_ntk: bool = False
    dtype: str = "float32"
    remat: str = "recompute"
    attention_block_size: int | None = 64
    recompute_chunk_size: int = 1
    knobs: Any = None
    attention_state: str = "auto"
    attention_state_budget_bytes: int = 1 << 30

    def __post_init__(self):
        _require(
            self.residual_method in SCHEMES,
            f"unknown residual_method {self.residual_method!r}; expected one of {list(SCHEMES)}",
        )
        object.__setattr__(self, "knobs", scheme_knobs(self.residual_method, self.knobs))
        object.__setattr__(self, "_scheme", SCHEMES[self.residual_method])  # resolved once (not a field)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        _require(self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even for RoPE")
        _require(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        _require(self.remat in REMAT_POLICIES, f"unknown remat {self.remat!r}; expected one of {REMAT_POLICIES}")
        _require(self.rope_ntk_ratio >= 1, f"rope_ntk_ratio must be >= 1, got {self.rope_ntk_ratio}")
        _require(self.attention_block_size is None or self.attention_block_size >= 1,
                 f"attention_block_size must be None or >= 1, got {self.attention_block_size}")
        _require(self.attention_state in ATTENTION_STATES,
                 f"unknown attention_state {self.attention_state!r}; expected one of {ATTENTION_STATES}")
        _require(self.attention_state_budget_bytes >= 0,
                 f"attention_state_budget_bytes must be >= 0, got {self.attention_state_budget_bytes}")
        _require(self.recompute_chunk_size >= 1, f"recompute_chunk_size must be >= 1, got {self.recompute_chunk_size}")
        for problem in self.scheme.check(self):
            _require(False, problem)

    @property
    def scheme(self):
        """The registered connection scheme of `residual_method`, resolved when the config was
        made (connections/): what the layer, stack, FLOP counter, cache and plots ask."""
        return self._scheme

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def probs_state_bytes(self, batch: int, seq: int) -> int:
        """Bytes of L float32 [b, nh, s, s] arrays: what the "probs" attention state keeps."""
        return 4 * self.num_hidden_layers * batch * self.num_attention_heads * seq * seq

    def with_attention_state(self, batch: int, seq: int) -> "ModelConfig":
        """This config with "auto" resolved to "qk" or "probs" for a [batch, seq] input."""
        if self.attention_state != "auto":
            return self
        running_sum = self.scheme.probs_state == "score_sum"
        fits = self.probs_state_bytes(batch, seq) <= self.attention_state_budget_bytes
        return self.replace(attention_state="probs" if fits and running_sum else "qk")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def knob_values(self) -> dict[str, Any]:
        """The scheme's knobs as name -> value (what config.json stores)."""
        return dataclasses.asdict(self.knobs)

    @classmethod
    def from_hf(cls, hf_config, residual_method: str = "standard", **overrides) -> "ModelConfig":
        """From a `transformers.LlamaConfig` (or anything with its attribute names). The knobs of
        `residual_method` it carries (flat, as config.json stores them) are taken over; knob
        names among `overrides` set knobs too."""
        values = {name: getattr(hf_config, name) for name in HF_FIELDS if hasattr(hf_config, name)}
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
            raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
        if getattr(hf_config, "num_key_value_heads", None) is None:
            values["num_key_value_heads"] = hf_config.num_attention_heads
        values["rope_theta"] = _hf_rope_theta(hf_config)
        knob_names = {f.name for f in dataclasses.fields(SCHEMES[residual_method].knobs)} if residual_method in SCHEMES \
            else set()
        knobs = {name: getattr(hf_config, name) for name in knob_names if hasattr(hf_config, name)}
        knobs.update({name: overrides.pop(name) for name in list(overrides) if name in knob_fields()})
        return cls(**{**values, "residual_method": residual_method, "knobs": knobs, **overrides})

    def to_hf(self):
        """The matching `transformers.LlamaConfig` (standard architecture fields only)."""
        from transformers import LlamaConfig

        return LlamaConfig(**{name: getattr(self, name) for name in HF_FIELDS})


def scheme_knobs(method: str, knobs) -> Any:
    """The knobs dataclass instance of `method` from None (its defaults), a mapping of knob names
    to values, or another scheme's knobs (their values away from the defaults carry over)."""
    kind = SCHEMES[method].knobs
    if isinstance(knobs, kind):
        return knobs
    if knobs is None:
        values = {}
    elif isinstance(knobs, Mapping):
        values = dict(knobs)
    elif dataclasses.is_dataclass(knobs):
        values = {f.name: getattr(knobs, f.name) for f in dataclasses.fields(knobs) if getattr(knobs, f.name) != f.default}
    else:
        raise ValueError(f"knobs must be a mapping or a knobs dataclass, got {knobs!r}")
    names = [f.name for f in dataclasses.fields(kind)]
    for name, value in values.items():
        if name not in names:
            raise ValueError(f"{name}={value!r} does not apply to {method!r}; its knobs: {names or 'none'}")
    return kind(**values)


def _hf_rope_theta(hf_config) -> float:
    """rope_theta lives on the config in older transformers, in rope_parameters in newer ones."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
