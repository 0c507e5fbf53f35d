"""The benchmark harness: the fixed model, contenders' train steps, interleaved timing,
compiled memory and FLOPs (from `jax_residual.train.flops`, the counter training logs use).

One "train step" = forward + mean next-token cross-entropy + backward to every parameter (no
optimiser), on identical weights: torch_ref's seeded init, converted with
`jax_residual.convert.params_from_state_dict`. JAX steps are jitted and warmed up; torch runs
eager.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

# The fixed benchmark model: 8 layers, hidden 256, 8 / 4 heads.
MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4)
GiB = 2**30
PAUSE_S = 0.2
# glibc settings applied to the benchmark process (re-executed with them) and its children, the
# same for both frameworks: heap (not mmap) for blocks up to 32 MiB and no trimming, so torch's
# eager allocations stop page-faulting after the first step; transparent huge pages for the
# large mmapped blocks (XLA's per-step temp buffer).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def machine_info() -> dict:
    import flax
    import jax
    import torch
    import transformers

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "jax_backend": jax.default_backend(), "jax_devices": [d.device_kind for d in jax.devices()],
            "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_at_start": os.getloadavg(),
            "torch_device": torch_device(),
            "torch_device_name": torch.cuda.get_device_name() if torch_device() == "cuda" else cpu}


def torch_device() -> str:
    """Where torch_ref and HF run: "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(result):
    """`result` once the device has finished it (CUDA kernels are asynchronous; a timed torch
    step must wait for them, as the JAX steps block_until_ready)."""
    import torch

    if torch_device() == "cuda":
        torch.cuda.synchronize()
    return result


def interleaved_medians(steps: dict, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Run every step once per round (after `warmup` untimed calls each); per step: median/min
    seconds of the timed calls.

    Each timed call follows a short pause (so spinning worker threads of the other framework
    have gone idle) and then one untimed call of the same step: a training loop runs its steps
    back to back, and XLA:CPU's first step after an idle pause runs up to ~1.9x slower (its
    worker threads wake up: benchmarks/README.md; torch eager is unaffected).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            time.sleep(PAUSE_S)
            step()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "all_s": [round(x, 4) for x in t]}
            for name, t in times.items()}


def hf_config(layers: int = 8, seq: int = 256, **overrides):
    import transformers

    values = dict(MODEL, num_hidden_layers=layers, max_position_embeddings=max(seq, 256),
                  attn_implementation="sdpa", tie_word_embeddings=False)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def random_ids(batch: int, seq: int, vocab: int = 256):
    return np.random.default_rng(0).integers(0, vocab, (batch, seq))


def torch_model(method: str, layers: int = 8, seq: int = 256):
    import torch

    from torch_ref.modeling.llama import ResidualLlamaForCausalLM

    torch.manual_seed(0)
    return ResidualLlamaForCausalLM(hf_config(layers, seq), method).to(torch_device())


def torch_step_fn(model, ids):
    """One eager forward + backward of the mean next-token cross-entropy."""
    import torch
    import torch.nn.functional as F

    ids = torch.from_numpy(ids).to(torch_device())
    vocab = model.config.vocab_size

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    return step


def hf_step_fn(model, ids):
    """One eager forward + backward of HF's own (labels=) loss."""
    import torch

    ids = torch.from_numpy(ids).to(torch_device())

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item()

    return step


def bench_config(method: str, layers: int = 8, seq: int = 256, **cfg_overrides):
    """The benchmark model's `ModelConfig` with this method (and config overrides)."""
    from jax_residual.config import ModelConfig

    return ModelConfig.from_hf(hf_config(layers, seq), residual_method=method, **cfg_overrides)


def jax_train_step(method: str, layers: int = 8, seq: int = 256, state_dict=None, **cfg_overrides):
    """(jitted value_and_grad of the loss, params, config) of the JAX model; params from
    `state_dict` (a torch_ref state dict) or the model's own init."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jax_residual import convert
    from jax_residual.model import LlamaForCausalLM

    cfg = bench_config(method, layers, seq, **cfg_overrides)
    model = LlamaForCausalLM(cfg)
    if state_dict is None:
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    else:
        params = nn.meta.unbox(convert.params_from_state_dict(state_dict, cfg))

    def loss_fn(params, ids):
        logits = model.apply({"params": params}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss_fn)), params, cfg


def compiled_memory(step, params, ids) -> dict:
    """XLA's buffer assignment for one compiled step: temp (activations, residuals, scratch)
    and argument/output bytes; `peak_bytes` = temp + arguments + outputs - aliased."""
    compiled = step.lower(params, ids).compile()
    analysis = compiled.memory_analysis()
    out = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
           for name in ("temp", "argument", "output", "alias")}
    out["peak_bytes"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out, compiled


def stored_state_bytes(cfg, batch: int, seq: int) -> int:
    """The scan carry's stored post-RoPE Q and K: L * b * s * (nh + nkv) * hd * 4 bytes."""
    return cfg.num_hidden_layers * batch * seq * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim * 4


def step_flops(cfg, batch: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one train step on batch x seq tokens, by part (`flops_per_token_parts`:
    "layers", "lm_head", "recompute", "scores", ..., "total"), and "total_linear_memory": the
    total plus the four Q K^T-sized matmuls per re-run pair that re-running from stored Q/K
    (not P) must add, the arithmetic limit of a memory-linear implementation."""
    from jax_residual.train import flops

    tokens = batch * seq
    out = {name: tokens * value for name, value in flops.flops_per_token_parts(cfg, seq).items()}
    out["total_linear_memory"] = out["total"] + tokens * flops.qk_rerun_flops_per_token(cfg, seq)
    return out


def timed_variants(method: str, variants: dict[str, dict], args, seq=None, batch=None) -> dict:
    """Step time + compiled memory of one method under several config overrides."""
    import jax
    import jax.numpy as jnp

    seq, batch = seq or args.seq, batch or args.batch
    ids = jnp.asarray(random_ids(batch, seq))
    steps, out = {}, {}
    for name, overrides in variants.items():
        step, params, cfg = jax_train_step(method, args.layers, seq, **overrides)
        memory, compiled = compiled_memory(step, params, ids)
        out[name] = {"overrides": overrides, "jax_memory": memory}
        steps[name] = (lambda c=compiled, p=params: jax.block_until_ready(c(p, ids)))
    for name, t in interleaved_medians(steps, args.rounds).items():
        out[name].update(t)
    base = next(iter(out.values()))
    for name, row in out.items():
        row["time_vs_first"] = row["median_s"] / base["median_s"]
        row["temp_vs_first"] = row["jax_memory"]["temp"] / base["jax_memory"]["temp"]
        print(f"  {method:8s} {name:16s} {row['median_s'] * 1e3:8.0f} ms  x{row['time_vs_first']:.2f}   "
              f"temp {row['jax_memory']['temp'] / 2**20:7.0f} MiB  x{row['temp_vs_first']:.2f}", flush=True)
    return out
