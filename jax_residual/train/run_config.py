"""RunConfig: every setting of one training run, its model, and the checks that run before compiling.

A run is identified by the settings that change what it computes (`identity`); the default
output directory is named from them, so rerunning the same command finds and resumes the
same run, and `steps` is deliberately not part of it (a larger --steps continues a run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Any

from jax_residual import ModelConfig, sharding
from jax_residual.data.tokenizer import VOCAB_SIZE
from jax_residual.data.tokenizer import BYTES, spec_vocab_size

# The default method (see --help): method5.2 sums the attention scores of every layer so far
# (stored post-RoPE Q/K), scaled by 1/sqrt(hd * m). It re-runs no earlier layer, so it is among
# the cross-layer methods with the fewest extra FLOPs (train/flops.py): a few CPU minutes buy the most
# training of a non-standard model.
DEFAULT_METHOD = "method5.2"

# name -> (hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
PRESETS = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (192, 4, 6, 2, 512),
    "base": (512, 8, 8, 4, 1408),
}
MAX_POSITIONS = 1024  # max_position_embeddings of the presets
# model sizes that the mesh splits, and the logical axis each is split along (sharding.py)
SPLIT_SIZES = (("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab"),
               ("intermediate_size", "mlp"), ("hidden_size", "embed"))
SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")

# Fields that may change between invocations of the same run (how long, how often, where).
NON_IDENTITY_FIELDS = frozenset({
    "steps", "eval_every", "checkpoint_every", "keep_checkpoints", "output_dir", "mesh",
    "grad_accum", "peak_tflops", "inject_nan_at", "sample_tokens", "heartbeat_timeout",
})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Its model is derived (`model_config`): the method and its knobs, the
    preset's sizes (those set here override them; None: the preset's, or --init-from-hf's),
    dtype and remat; the vocabulary is the tokenizer's."""

    method: str = DEFAULT_METHOD
    preset: str = "small"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    dtype: str = "float32"
    remat: str = ModelConfig().remat
    knobs: tuple[tuple[str, Any], ...] = ()  # (name, value) of the scheme knobs set (connections/), sorted
    init_from_hf: str | None = None
    steps: int = 120
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 6e-3
    warmup_steps: int = 10
    decay_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int | None = None
    data: str | None = None
    tokenizer: str | None = None  # 'bytes' or 'bpe:N'; None: bytes, or --init-from-hf's tokenizer.json
    eval_every: int = 20
    eval_batches: int = 4
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    output_dir: str | None = None
    mesh: str | None = None
    peak_tflops: float | None = None
    inject_nan_at: int | None = None
    sample_tokens: int = 64
    heartbeat_timeout: int = 60  # seconds without a heartbeat before a process counts as lost

    @property
    def batch_seed(self) -> int:
        """Seed of the data order (defaults to `seed`; a sweep fixes it across its seeds)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def schedule_steps(self) -> int:
        """Length of the warmup + cosine schedule (`decay_steps`, default `steps`)."""
        return self.steps if self.decay_steps is None else self.decay_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_knobs(self, **values) -> "RunConfig":
        """The run with these scheme knobs set (the others kept)."""
        return self.replace(knobs=tuple(sorted((dict(self.knobs) | values).items())))


def identity(run: RunConfig) -> dict:
    """The settings that define what a run computes (everything a resumed run must share).
    Its knobs appear by name (none set: no entry, so runs named before the knobs existed keep
    their names and resume)."""
    values = {k: v for k, v in dataclasses.asdict(run).items() if k not in NON_IDENTITY_FIELDS and k != "knobs"}
    return values | dict(run.knobs)


def digest(settings: dict) -> str:
    """8 hex digits naming a JSON-able dict of settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def default_output_dir(run: RunConfig) -> pathlib.Path:
    """runs/<method>-<preset>-seed<seed>-<digest of the identity>: same command, same folder."""
    return pathlib.Path("runs") / f"{run.method}-{run.preset}-seed{run.seed}-{digest(identity(run))}"


def output_dir(run: RunConfig) -> pathlib.Path:
    return pathlib.Path(run.output_dir) if run.output_dir else default_output_dir(run)


def model_config(run: RunConfig) -> ModelConfig:
    """The ModelConfig of a preset run (the vocabulary of its tokenizer), size flags overriding the preset.

    Raises ValueError (from ModelConfig) for an unknown method, dtype or remat policy.
    """
    sizes = dict(zip(SIZE_FIELDS, PRESETS[run.preset]))
    sizes.update({name: getattr(run, name) for name in SIZE_FIELDS if getattr(run, name) is not None})
    return ModelConfig(
        vocab_size=spec_vocab_size(run.tokenizer),
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        num_key_value_heads=sizes["num_kv_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=MAX_POSITIONS,
        residual_method=run.method,
        dtype=run.dtype,
        remat=run.remat,
        knobs=dict(run.knobs),
    )


def problems(run: RunConfig, cfg: ModelConfig | None, mesh_shape: dict[str, int], num_devices: int,
             tokenizer_vocab: tuple[str, int] = (BYTES, VOCAB_SIZE)) -> list[str]:
    """Every inconsistency between the run, its model (None: it could not be built, so the
    checks against it are skipped), its tokenizer ((name, vocabulary size)) and the mesh, as
    messages saying what is allowed. Empty when the run can start. Needs no compilation (and
    no devices)."""
    found = []

    def need(condition: bool, message: str):
        if not condition:
            found.append(message)

    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints"):
        need(getattr(run, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(run, name)}")
    need(run.lr > 0, f"--lr must be > 0, got {run.lr}")
    need(run.sample_tokens >= 0, f"--sample-tokens must be >= 0, got {run.sample_tokens}")
    need(run.grad_clip > 0, f"--grad-clip must be > 0, got {run.grad_clip}")
    need(run.weight_decay >= 0, f"--weight-decay must be >= 0, got {run.weight_decay}")
    need(0 <= run.warmup_steps < run.schedule_steps,
         f"--warmup-steps must be in [0, --decay-steps or --steps) = [0, {run.schedule_steps}), got {run.warmup_steps}")
    need(run.preset in PRESETS, f"unknown --preset {run.preset!r}; allowed: {sorted(PRESETS)}")
    if run.init_from_hf:
        given = [f"--{n.replace('_', '-')}" for n in SIZE_FIELDS if getattr(run, n) is not None]
        need(not given, f"{', '.join(given)} cannot be combined with --init-from-hf (the checkpoint fixes the sizes)")
    devices = math.prod(mesh_shape.values())
    need(devices == num_devices, f"--mesh {mesh_shape} uses {devices} devices but {num_devices} are available; "
                                 f"the product of the axis sizes must equal the device count")
    batch_ways = sharding.mesh_ways(mesh_shape, "batch")
    need(run.grad_accum >= 1 and run.batch_size % (run.grad_accum * batch_ways) == 0,
         f"--batch-size {run.batch_size} must be divisible by --grad-accum x the mesh's {sharding.describe_ways('batch')} = "
         f"{run.grad_accum} x {batch_ways} (each micro-batch is split evenly over the batch devices)")
    if cfg is None:
        return found
    need(cfg.vocab_size >= tokenizer_vocab[1],
         f"the tokenizer ({tokenizer_vocab[0]}) has {tokenizer_vocab[1]} tokens but the model's vocab_size is "
         f"{cfg.vocab_size}")
    need(run.seq_len <= cfg.max_position_embeddings,
         f"--seq-len {run.seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    for name, axis in SPLIT_SIZES:
        ways = sharding.mesh_ways(mesh_shape, axis)
        need(getattr(cfg, name) % ways == 0,
             f"{name} = {getattr(cfg, name)} is not divisible by the mesh's {sharding.describe_ways(axis)} = {ways}")
    return found


def check(run: RunConfig, cfg: ModelConfig | None, mesh_shape: dict[str, int], num_devices: int,
          found_before: tuple[str, ...] = (), tokenizer_vocab: tuple[str, int] = (BYTES, VOCAB_SIZE)):
    """Raise ValueError listing `found_before` and every problem `problems` finds, in one line."""
    found = [*found_before, *problems(run, cfg, mesh_shape, num_devices, tokenizer_vocab)]
    if found:
        raise ValueError("invalid run: " + "; ".join(found))
