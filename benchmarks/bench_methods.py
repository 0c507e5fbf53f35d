"""Train-step speed and memory of the 12 residual methods: jax_residual vs torch_ref vs HF.

    python benchmarks/bench_methods.py                       # default sections, all methods
    python benchmarks/bench_methods.py --quick --methods standard,method1
    python benchmarks/bench_methods.py --sections memory     # memory vs sequence length / depth
    python benchmarks/bench_methods.py --sections longest    # longest method1 sequence per framework
    python benchmarks/bench_methods.py --sections seq1024    # method1/2 vs torch_ref at seq 1024

One "train step" = forward + mean next-token cross-entropy + backward to every parameter (no
optimiser), on identical weights: torch_ref's seeded init, converted with
`jax_residual.convert.params_from_state_dict`. JAX steps are jitted and warmed up; torch runs
eager. Timings are medians over interleaved rounds (each round runs every contender once), so
load from other processes hits all of them alike; ratios within one run are the numbers to read.
Devices: JAX runs on its default backend; torch_ref and HF run on CUDA when torch sees a GPU
(`torch_device`), else on the CPU; both are recorded under "machine" in the JSON. On a CUDA
backend the attention section adds bf16 rows: the blocked kernel vs the cuDNN path that
`functional.causal_attention` dispatches to there.

Sections (each writes its part of the JSON; a later run merges into the same file):
  peak      fp32 2048x2048 matmul FLOP/s in JAX and torch (the MFU denominator)
  speed     per method: step time, tokens/s, ratio to standard (same framework) vs the FLOP ratio
            of `model_flops`, MFU; torch_ref eager; HF LlamaForCausalLM (sdpa) for standard
  remat     method1 with remat none / recompute / layer: time and XLA temp memory (batch 2)
  knobs     method1 and method2 with rerun_window 1/2/4 and rerun_every 2/4: time, memory, FLOPs
  chunks    method1 and method2 with recompute_chunk_size 1, 2, 4, 8; method2 with
            attention_block_size None (dense) / 128 / 64 / 32 (batch 2)
  attention causal_attention: dense vs query-blocked vs jax.nn.dot_product_attention, and
            method 5's concatenated-Q/K contraction vs a per-layer score sum
  memory    compiled train-step memory (XLA buffer assignment) vs sequence length and depth,
            the stored Q/K state, and measured peak RSS of one step in a child process
  longest   longest method1 (b=1, 8 layers) sequence within a memory cap, per framework
  seq1024   standard / method1 / method2 at seq 1024 (batch 2): jax vs torch_ref
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("standard", "method1", "method2", "method3.1", "method3.2", "method4.1", "method4.2",
           "method5.1", "method5.2", "method5.3", "method5.4", "method5.5")
DEFAULT_SECTIONS = ("peak", "speed", "remat", "knobs", "chunks", "attention")
ALL_SECTIONS = DEFAULT_SECTIONS + ("memory", "longest", "seq1024")
# The fixed benchmark model (SPEC sizes of the brief): 8 layers, hidden 256, 8 / 4 heads.
MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4)
GiB = 2**30
PAUSE_S = 0.2
# glibc settings applied to this process (re-executed with them) and its children, the same for
# both frameworks: heap (not mmap) for blocks up to 32 MiB and no trimming, so torch's eager
# allocations stop page-faulting after the first step; transparent huge pages for the large
# mmapped blocks (XLA's per-step temp buffer), ~100k fewer page faults per step.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


# ----------------------------------------------------------------------------- FLOPs


def model_flops(method: str, batch: int, seq: int, layers: int = 8, hidden: int = 256, heads: int = 8,
                kv_heads: int = 4, intermediate: int = 512, vocab: int = 256,
                rerun_window: int | None = None, rerun_every: int = 1) -> dict[str, float]:
    """Matmul FLOPs of one train step (forward + backward = 3 x forward, multiply-add = 2).

    Per token and layer: Q/K/V/O projections, Q K^T and P V over the full s x s square (dense,
    as the torch reference and a masked XLA kernel run it), the SwiGLU MLP; plus the LM head.
    Re-running earlier layer i < l at layer l (SPEC B1) costs its V projection + P V + O
    projection (methods 2, 4.x), plus its MLP (methods 1, 3.x). Method 5.x adds one Q K^T per
    extra summed layer. Norms, RoPE and softmax are not counted. Returns the parts and "total",
    and "total_linear_memory": the total plus what re-running from stored Q/K (not P) must add
    per re-run pair: its Q K^T in the forward pass, again in the flash backward, and dQ, dK —
    four Q K^T-sized matmuls (the arithmetic limit of a memory-linear implementation).
    `rerun_window` / `rerun_every`: the cost knobs (fewer re-run pairs).
    """
    hd = hidden // heads
    q, kv = heads * hd, kv_heads * hd
    tokens = batch * seq
    projections = 2 * hidden * (q + 2 * kv) + 2 * q * hidden
    qk = pv = 2 * seq * q
    mlp = 2 * 3 * hidden * intermediate
    from jax_residual.residual import rerun_pair_count

    pairs = rerun_pair_count(layers, rerun_window, rerun_every)  # (l, re-run i < l)
    parts = {"layers": layers * (projections + qk + pv + mlp), "lm_head": 2 * hidden * vocab}
    if method in ("method1", "method2", "method3.1", "method3.2", "method4.1", "method4.2"):
        parts["recompute"] = pairs * (2 * hidden * kv + pv + 2 * q * hidden)
        if method in ("method1", "method3.1", "method3.2"):
            parts["recompute"] += pairs * mlp
    if method.startswith("method5"):
        parts["scores"] = pairs * qk
    parts = {name: 3.0 * tokens * value for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    parts["total_linear_memory"] = parts["total"] + ("recompute" in parts) * tokens * pairs * 4 * qk
    return parts


# ----------------------------------------------------------------------------- helpers


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
    worker threads wake up; measured in this repo: 0.62 s back to back vs 0.95-1.2 s after a
    0.2-3 s pause for the standard step; torch eager is unaffected).
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


def jax_train_step(method: str, layers: int = 8, seq: int = 256, state_dict=None, **cfg_overrides):
    """(jitted value_and_grad of the loss, params, config) of the JAX model; params from
    `state_dict` (a torch_ref state dict) or the model's own init."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jax_residual import convert
    from jax_residual.config import ModelConfig
    from jax_residual.model import LlamaForCausalLM

    cfg = ModelConfig.from_hf(hf_config(layers, seq), residual_method=method, **cfg_overrides)
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


# ----------------------------------------------------------------------------- sections


MATMUL_N = 2048
MATMUL_FLOPS = 2 * MATMUL_N**3


def matmul_peak_steps() -> dict:
    """fp32 2048 x 2048 matmuls, jax (jitted) and torch: the MFU denominator. The speed section
    runs them inside its rounds, so each method's MFU uses a peak measured under the same load."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    t_a = torch.from_numpy(np.array(a)).to(torch_device())
    return {"matmul_jax": lambda: matmul(a, a).block_until_ready(), "matmul_torch": lambda: torch_sync(t_a @ t_a)}


def section_peak(args) -> dict:
    times = interleaved_medians(matmul_peak_steps(), rounds=args.rounds * 2)
    return {name.removeprefix("matmul_"): {"flops_per_s": MATMUL_FLOPS / t["min_s"],
                                            "median_flops_per_s": MATMUL_FLOPS / t["median_s"], **t}
            for name, t in times.items()}


def section_speed(args) -> dict:
    """Per method: jax and torch_ref step times in interleaved rounds; HF sdpa with standard."""
    import jax
    import jax.numpy as jnp

    peak_steps = matmul_peak_steps()
    ids = random_ids(args.batch, args.seq)
    tokens = args.batch * args.seq
    rows = {}
    for method in args.methods:
        model = torch_model(method, args.layers, args.seq)
        step, params, cfg = jax_train_step(method, args.layers, args.seq, model.state_dict())
        jax_ids = jnp.asarray(ids)
        start = time.perf_counter()
        memory, compiled = compiled_memory(step, params, jax_ids)
        compile_s = time.perf_counter() - start
        steps = {"jax": lambda c=compiled, p=params, i=jax_ids: jax.block_until_ready(c(p, i)), **peak_steps}
        if not args.no_torch:
            steps["torch_ref"] = torch_step_fn(model, ids)
            if method == "standard":
                import transformers

                hf = transformers.LlamaForCausalLM(hf_config(args.layers, args.seq)).to(torch_device())
                hf.load_state_dict(model.state_dict(), strict=False)
                steps["hf_sdpa"] = hf_step_fn(hf, ids)
        times = interleaved_medians(steps, args.rounds)
        flops = model_flops(method, args.batch, args.seq, args.layers)
        row = {"flops": flops, "jax_compile_s": compile_s, "jax_memory": memory,
               "peak_flops_per_s": {name: MATMUL_FLOPS / times.pop(f"matmul_{name}")["median_s"] for name in ("jax", "torch")}}
        for name, t in times.items():
            framework_peak = row["peak_flops_per_s"]["jax" if name == "jax" else "torch"]
            row[name] = {**t, "tokens_per_s": tokens / t["median_s"], "mfu": flops["total"] / t["median_s"] / framework_peak}
        rows[method] = row
        print(format_speed_row(method, row), flush=True)
        del model, compiled
    add_ratios(rows)
    return {"batch": args.batch, "seq": args.seq, "layers": args.layers, "rounds": args.rounds, "methods": rows}


def hf_step_fn(model, ids):
    import torch

    ids = torch.from_numpy(ids).to(torch_device())

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item()

    return step


def add_ratios(rows: dict) -> None:
    """time ratio to standard (same framework) next to the FLOP ratio; their quotient is the
    overhead above the arithmetic limit (1.0 = the method costs exactly its extra FLOPs)."""
    if "standard" not in rows:
        return
    base = rows["standard"]
    for row in rows.values():
        row["flop_ratio"] = row["flops"]["total"] / base["flops"]["total"]
        row["flop_ratio_linear_memory"] = row["flops"]["total_linear_memory"] / base["flops"]["total"]
        for name in ("jax", "torch_ref"):
            if name in row and name in base:
                ratio = row[name]["median_s"] / base[name]["median_s"]
                row[name]["time_ratio"] = ratio
                row[name]["overhead_vs_flops"] = ratio / row["flop_ratio"]
                row[name]["overhead_vs_linear_memory_flops"] = ratio / row["flop_ratio_linear_memory"]
        if "jax" in row and "torch_ref" in row:
            row["jax_speedup_vs_torch_ref"] = row["torch_ref"]["median_s"] / row["jax"]["median_s"]


def format_speed_row(method, row) -> str:
    parts = [f"{method:10s} GFLOP {row['flops']['total'] / 1e9:7.1f}"]
    for name in ("jax", "torch_ref", "hf_sdpa"):
        if name in row:
            mfu = row[name]["mfu"]
            parts.append(f"{name} {row[name]['median_s'] * 1e3:8.0f} ms" + ("" if mfu is None else f" (MFU {mfu:4.0%})"))
    parts.append(f"xla temp {row['jax_memory']['temp'] / 2**20:6.0f} MiB  compile {row['jax_compile_s']:.0f}s")
    return "  ".join(parts)


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


def section_remat(args) -> dict:
    """method1 (batch --knob-batch) under the three remat policies."""
    return {"batch": args.knob_batch, "method1": timed_variants(
        "method1", {f"remat={r}": {"remat": r} for r in ("none", "recompute", "layer")}, args, batch=args.knob_batch)}


KNOBS = {"all earlier layers": {}, "window=1": {"rerun_window": 1}, "window=2": {"rerun_window": 2},
         "window=4": {"rerun_window": 4}, "every=2": {"rerun_every": 2}, "every=4": {"rerun_every": 4},
         "window=4,every=2": {"rerun_window": 4, "rerun_every": 2}}


def section_knobs(args) -> dict:
    """The cost knobs of methods 1-4 (rerun_window, rerun_every), method1 and method2 at batch
    --knob-batch: time and memory against re-running all earlier layers, next to the FLOP ratio
    the knob predicts (linear-memory count)."""
    out = {"batch": args.knob_batch}
    for method in ("method1", "method2"):
        rows = timed_variants(method, KNOBS, args, batch=args.knob_batch)
        base = model_flops(method, args.knob_batch, args.seq, args.layers)["total_linear_memory"]
        for row in rows.values():
            row["flops_vs_first"] = model_flops(method, args.knob_batch, args.seq, args.layers,
                                                **row["overrides"])["total_linear_memory"] / base
        print("  flops vs first: " + ", ".join(f"{n} x{r['flops_vs_first']:.2f}" for n, r in rows.items()), flush=True)
        out[method] = rows
    return out


def section_chunks(args) -> dict:
    """method1 and method2 (batch --knob-batch) with recompute_chunk_size 1, 2, 4, 8, and the
    attention query block size (method2: None = dense, 128, 64, 32)."""
    sizes = (1, 2, 4, 8) if not args.quick else (1, 4, 8)
    out = {"batch": args.knob_batch}
    for method in ("method1", "method2"):
        out[method] = timed_variants(method, {f"chunk={c}": {"recompute_chunk_size": c} for c in sizes}, args,
                                     batch=args.knob_batch)
    out["attention_block_size"] = timed_variants(
        "method2", {f"block={b}": {"attention_block_size": b} for b in (None, 128, 64, 32)}, args, batch=args.knob_batch)
    return out


def section_attention(args) -> dict:
    """causal_attention forward+backward on [b, s, nh, hd]: dense (one block), query blocks of
    512 / 256, and jax.nn.dot_product_attention (XLA); plus method 5's score forms. On CUDA
    also bf16: the blocked kernel (blocks of 64, the model's default) vs cuDNN."""
    import jax
    import jax.numpy as jnp

    from jax_residual import functional as F

    b, nh, nkv, hd = 1, 8, 4, 32
    out = {}
    seqs = (1024, 4096) if args.quick else (256, 1024, 4096)
    for seq in seqs:
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(key[0], (b, seq, nh, hd))
        k = jax.random.normal(key[1], (b, seq, nkv, hd))
        v = jax.random.normal(key[2], (b, seq, nkv, hd))
        variants = {
            "dense": lambda q, k, v: F.causal_attention(q, k, v, hd**-0.5),
            "blocks_512": lambda q, k, v, seq=seq: F.causal_attention(q, k, v, hd**-0.5, min(512, seq)),
            "blocks_256": lambda q, k, v: F.causal_attention(q, k, v, hd**-0.5, 256),
            "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=hd**-0.5, is_causal=True, implementation="xla"),
        }
        out[seq] = grad_variants(variants, (q, k, v), args, f"attention s={seq}")
        if F.backend_platform() == "cuda":  # what the bf16 dispatch picks there, against the fallback
            bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
            out[f"{seq}_bf16"] = grad_variants(
                {name: lambda q, k, v, name=name: F.causal_attention(q, k, v, hd**-0.5, 64, implementation=name)
                 for name in F.ATTENTION_IMPLEMENTATIONS}, bf16, args, f"attention bf16 s={seq}")
    out["method5"] = method5_scores(args)
    return out


def grad_variants(variants, inputs, args, label) -> dict:
    import jax
    import jax.numpy as jnp

    steps, rows = {}, {}
    for name, fn in variants.items():
        grad = jax.jit(jax.grad(lambda *x, fn=fn: jnp.sum(fn(*x) ** 2), argnums=tuple(range(len(inputs)))))
        compiled = grad.lower(*inputs).compile()
        analysis = compiled.memory_analysis()
        rows[name] = {"temp_bytes": int(analysis.temp_size_in_bytes)}
        steps[name] = lambda c=compiled: jax.block_until_ready(c(*inputs))
    for name, t in interleaved_medians(steps, args.rounds).items():
        rows[name].update(t)
        print(f"  {label:20s} {name:30s} {t['median_s'] * 1e3:8.1f} ms  temp {rows[name]['temp_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    return rows


def method5_scores(args) -> dict:
    """sum_{i<=l} c_i Q_i K_i^T then softmax and PV, at l = L-1 with L = 8 stored layers
    (b=8, s=256): the concatenated single contraction (the model's form) vs summing L
    per-layer score matrices (a naive form whose backward keeps every [s, s] term)."""
    import jax
    import jax.numpy as jnp

    from jax_residual import functional as F

    L, b, s, nh, nkv, hd = args.layers, args.batch, args.seq, 8, 4, 32
    key = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(key[0], (L, b, s, nh, hd))
    k = jax.random.normal(key[1], (L, b, s, nkv, hd))
    v = jax.random.normal(key[2], (b, s, nkv, hd))
    c = jnp.full((L,), (L**-0.5) * hd**-0.5)

    def concatenated(q, k, v):
        q_cat = jnp.moveaxis(q * c[:, None, None, None, None], 0, -2).reshape(b, s, nh, L * hd)
        return F.causal_attention(q_cat, jnp.moveaxis(k, 0, -2).reshape(b, s, nkv, L * hd), v, 1.0)

    def summed(q, k, v):
        g = nh // nkv
        scores = jnp.einsum("lbqkgd,lbtkd,l->bkgqt", q.reshape(L, b, s, nkv, g, hd), k, c)
        scores = jnp.where(F.causal_mask(s), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bkgqt,btkd->bqkgd", probs, v).reshape(b, s, nh, hd)

    return grad_variants({"concatenated_qk": concatenated, "sum_of_scores": summed}, (q, k, v), args, "method5 scores")


def section_seq1024(args) -> dict:
    import copy

    sub = copy.copy(args)
    sub.seq, sub.batch = 1024, 2
    sub.methods = [m for m in ("standard", "method1", "method2") if m in args.methods] or ["standard", "method1", "method2"]
    return section_speed(sub)


# ----------------------------------------------------------------------------- memory (child processes)


def child_step(framework: str, method: str, seq: int, batch: int, layers: int) -> dict:
    """Runs in a child process: one train step; reports RSS before the step and the peak."""
    import torch

    torch.set_num_threads(os.cpu_count())
    ids = random_ids(batch, seq)
    model = torch_model(method, layers, seq)
    out = {}
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        step, params, cfg = jax_train_step(method, layers, seq, model.state_dict())
        del model
        ids = jnp.asarray(ids)
        memory, compiled = compiled_memory(step, params, ids)
        out["jax_memory"] = memory
        out["rss_before_bytes"] = rss_now()
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, ids))
    else:
        step = torch_step_fn(model, ids)
        out["rss_before_bytes"] = rss_now()
        start = time.perf_counter()
        step()
    out["step_s"] = time.perf_counter() - start
    out["peak_rss_bytes"] = rss_now("VmHWM")  # not ru_maxrss: Linux carries the parent's over fork+exec
    return out


def rss_now(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def run_child(framework, method, seq, batch, layers, cap_bytes, timeout_s) -> dict:
    """One child step with a memory cap (RSS polled every 20 ms; killed above the cap) and a
    time limit. Returns the child's report, or {"failed": reason}."""
    command = [sys.executable, __file__, "--child", framework, method, str(seq), str(batch), str(layers)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start, peak_seen = time.perf_counter(), 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        except (FileNotFoundError, StopIteration):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if rss > cap_bytes or time.perf_counter() - start > timeout_s:
            child.kill()
            child.wait()
            reason = "memory cap" if rss > cap_bytes else "time limit"
            return {"failed": reason, "peak_rss_seen_bytes": peak_seen, "wall_s": time.perf_counter() - start}
        time.sleep(0.02)
    lines = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {"failed": f"exit code {child.returncode}", "peak_rss_seen_bytes": peak_seen}
    return {**json.loads(lines[-1]), "peak_rss_seen_bytes": peak_seen, "wall_s": time.perf_counter() - start}


def section_memory(args) -> dict:
    """Compiled memory vs sequence length (L=8, b=1) and depth (s=256, b=1) for a few methods,
    plus the measured peak RSS of one step (child process) for jax and torch_ref."""
    import jax.numpy as jnp

    methods = [m for m in ("standard", "method1", "method2", "method5.1") if m in args.methods] or ["standard", "method1"]
    out = {"seq": {}, "depth": {}, "rss": {}}
    for method in methods:
        for seq in (256, 1024, 4096):
            step, params, cfg = jax_train_step(method, 8, seq)
            memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, seq)))
            memory["stored_qk_bytes"] = stored_state_bytes(cfg, 1, seq) if method != "standard" else 0
            out["seq"].setdefault(method, {})[seq] = memory
            print(f"  memory {method:9s} L=8 s={seq:5d}: temp {memory['temp'] / 2**20:8.1f} MiB  "
                  f"stored Q/K {memory['stored_qk_bytes'] / 2**20:6.1f} MiB", flush=True)
        for layers in (4, 8, 16):
            for remat in ("recompute", "layer") if method != "standard" else ("recompute",):
                step, params, cfg = jax_train_step(method, layers, 256, remat=remat)
                memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, 256)))
                memory["stored_qk_bytes"] = stored_state_bytes(cfg, 1, 256) if method != "standard" else 0
                out["depth"].setdefault(method if remat == "recompute" else f"{method} remat=layer", {})[layers] = memory
                print(f"  memory {method:9s} remat={remat:9s} L={layers:2d} s=256: "
                      f"temp {memory['temp'] / 2**20:8.1f} MiB", flush=True)
    cap = int(args.mem_cap_gb * GiB)
    for method in ("standard", "method1"):
        for seq in (256, 1024) if args.quick else (256, 1024, 2048):
            for framework in ("jax", "torch"):
                report = run_child(framework, method, seq, 1, 8, cap, args.child_timeout_s)
                out["rss"].setdefault(method, {}).setdefault(framework, {})[seq] = report
                print(f"  rss {method:9s} {framework:5s} s={seq:5d}: " + describe_child(report), flush=True)
    return out


def describe_child(report) -> str:
    if "failed" in report:
        return f"failed ({report['failed']}), peak seen {report['peak_rss_seen_bytes'] / GiB:.2f} GiB"
    grown = report["peak_rss_bytes"] - report["rss_before_bytes"]
    return f"peak RSS {report['peak_rss_bytes'] / GiB:.2f} GiB (+{grown / GiB:.2f} in the step), step {report['step_s']:.1f}s"


def section_longest(args) -> dict:
    """Longest method1 sequence (b=1, 8 layers) whose train step fits the memory cap.

    torch_ref: doubling s = 512, 1024, ... in child processes, each killed above the cap (RSS
    polled) or after --child-timeout-s; the last success is measured. Where the time limit
    rather than memory stops the search, a quadratic fit of peak RSS vs s over the measured
    points extrapolates to the cap. jax: XLA plans every buffer at compile time, so the
    compiled peak (temp + arguments + outputs) plus the runtime's fixed overhead (measured
    RSS minus compiled peak at the largest executed s) decides fit, doubling up to 2^20
    without executing; executed children validate the smaller sizes.
    """
    import jax.numpy as jnp

    cap = int(args.mem_cap_gb * GiB)
    deadline = time.perf_counter() + args.longest_budget_s
    out = {"cap_bytes": cap, "method": "method1", "batch": 1, "layers": 8}
    measured = {}
    for framework in ("torch", "jax"):
        seq, runs = 512, {}
        while time.perf_counter() < deadline:
            report = run_child(framework, "method1", seq, 1, 8, cap, min(args.child_timeout_s, deadline - time.perf_counter()))
            runs[seq] = report
            print(f"  longest {framework:5s} s={seq:6d}: " + describe_child(report), flush=True)
            if "failed" in report:
                break
            seq *= 2
        measured[framework] = runs
    out["runs"] = measured
    out["torch"] = longest_from_runs(measured["torch"], cap)
    overhead = max((r["peak_rss_bytes"] - r["jax_memory"]["peak_bytes"] for r in measured["jax"].values() if "failed" not in r),
                   default=0)
    seq, planned = 512, {}
    while seq <= 2**20:
        step, params, cfg = jax_train_step("method1", 8, seq)
        memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, seq)))
        planned[seq] = memory["peak_bytes"] + overhead
        print(f"  longest jax   s={seq:6d}: compiled peak {memory['peak_bytes'] / GiB:.2f} GiB + overhead "
              f"{overhead / GiB:.2f} GiB", flush=True)
        if planned[seq] > cap:
            break
        seq *= 2
    fits = [s for s, b in planned.items() if b <= cap]
    out["jax"] = {"longest_seq": max(fits) if fits else None, "planned_bytes": planned, "runtime_overhead_bytes": overhead,
                  "how": "compiled memory_analysis + measured runtime overhead"}
    if out["torch"]["longest_seq"] and out["jax"]["longest_seq"]:
        out["jax_over_torch"] = out["jax"]["longest_seq"] / out["torch"]["longest_seq"]
    return out


def longest_from_runs(runs: dict, cap: int) -> dict:
    ok = {s: r["peak_rss_bytes"] for s, r in runs.items() if "failed" not in r}
    failed = [s for s, r in runs.items() if "failed" in r]
    result = {"longest_measured_seq": max(ok) if ok else None, "how": "measured"}
    result["longest_seq"] = result["longest_measured_seq"]
    if failed and runs[min(failed)]["failed"] == "time limit" and len(ok) >= 2:
        seqs = np.array(sorted(ok), float)
        coeffs = np.polyfit(seqs, [ok[s] for s in sorted(ok)], min(2, len(ok) - 1))
        roots = [r.real for r in np.roots(coeffs - np.array([0] * (len(coeffs) - 1) + [cap])) if r.real > 0 and abs(r.imag) < 1e-6]
        if roots:
            result.update(longest_seq=int(2 ** np.floor(np.log2(min(roots)))), extrapolated_seq_at_cap=float(min(roots)),
                          how="quadratic fit of measured peak RSS, extrapolated to the cap (time limit reached)")
    return result


# ----------------------------------------------------------------------------- main


def summarize(results) -> list[str]:
    """Markdown tables of the speed, remat, knobs and chunks sections (pasted into
    benchmarks/README.md). Times are medians (min in parentheses); ratios are of medians,
    "overhead" = time ratio / FLOP ratio."""
    lines = []
    for section in ("speed", "seq1024"):
        rows = results.get(section, {}).get("methods", {})
        if not rows:
            continue
        head = results[section]
        lines += [f"{section}: batch {head['batch']}, seq {head['seq']}, {head['layers']} layers, {head['rounds']} rounds",
                  "| method | GFLOP | FLOP ratio | FLOP ratio, Q/K re-run | jax ms | jax ratio | jax overhead | "
                  "jax overhead vs Q/K re-run | jax MFU | torch_ref ms | torch ratio | torch MFU | jax speedup | hf sdpa ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            cells = [method, f"{row['flops']['total'] / 1e9:.1f}", _fmt(row.get("flop_ratio"), "{:.2f}"),
                     _fmt(row.get("flop_ratio_linear_memory"), "{:.2f}")]
            for name in ("jax", "torch_ref"):
                timing = row.get(name)
                if timing is None:
                    cells += ["", "", "", "", ""] if name == "jax" else ["", "", ""]
                    continue
                cells.append(ms_cell(timing))
                cells.append(_fmt(timing.get("time_ratio"), "{:.2f}"))
                if name == "jax":
                    cells.append(_fmt(timing.get("overhead_vs_flops"), "{:.2f}"))
                    cells.append(_fmt(timing.get("overhead_vs_linear_memory_flops"), "{:.2f}"))
                cells.append(_fmt(timing.get("mfu"), "{:.0%}"))
            cells.append(_fmt(row.get("jax_speedup_vs_torch_ref"), "{:.2f}x"))
            hf = row.get("hf_sdpa")
            cells.append("" if hf is None else ms_cell(hf))
            lines.append(markdown_row(cells))
    for section in ("remat", "knobs", "chunks"):
        groups = {group: rows for group, rows in results.get(section, {}).items() if group != "batch"}
        for group, rows in groups.items():
            lines += variant_table(f"{section}: {group}, batch {results[section]['batch']}", rows)
    return lines


def variant_table(title: str, rows: dict) -> list[str]:
    """One markdown table of `timed_variants` rows (ratios against the first row)."""
    flops = any("flops_vs_first" in row for row in rows.values())
    lines = [title, "| variant | ms (min) | time ratio | XLA temp MiB | temp ratio |" + (" FLOP ratio |" if flops else ""),
             "|---|---|---|---|---|" + ("---|" if flops else "")]
    for name, row in rows.items():
        cells = [name, ms_cell(row), f"{row['time_vs_first']:.2f}",
                 f"{row['jax_memory']['temp'] / 2**20:.0f}", f"{row['temp_vs_first']:.2f}"]
        if flops:
            cells.append(f"{row['flops_vs_first']:.2f}")
        lines.append(markdown_row(cells))
    return lines


def ms_cell(timing: dict) -> str:
    """Median milliseconds with the min in parentheses."""
    return f"{timing['median_s'] * 1e3:.0f} ({timing['min_s'] * 1e3:.0f})"


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value, pattern) -> str:
    return "" if value is None else pattern.format(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated of {ALL_SECTIONS}, or 'all'")
    parser.add_argument("--quick", action="store_true", help="2 timing rounds, fewer variants")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds after a warm-up (default 3; --quick 2)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--knob-batch", type=int, default=2, help="batch of the remat and chunks sections")
    parser.add_argument("--no-torch", action="store_true", help="jax only in the speed section")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0, help="memory cap of the child processes")
    parser.add_argument("--child-timeout-s", type=float, default=300.0)
    parser.add_argument("--longest-budget-s", type=float, default=1200.0)
    parser.add_argument("--summarize", action="store_true", help="only print the tables of the results JSON")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_methods.json"))
    args = parser.parse_args(argv)
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; expected {METHODS}")
    args.sections = list(ALL_SECTIONS) if args.sections == "all" else args.sections.split(",")
    if set(args.sections) - set(ALL_SECTIONS):
        parser.error(f"unknown sections {sorted(set(args.sections) - set(ALL_SECTIONS))}; expected {ALL_SECTIONS}")
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def main(argv=None):
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        framework, method, seq, batch, layers = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        print(json.dumps(child_step(framework, method, seq, batch, layers)))
        return
    args = parse_args(argv)
    if not args.no_malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    out_path = pathlib.Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.summarize:
        print("\n".join(summarize(results)))
        return
    results["machine"] = {**machine_info(), "malloc_env": {} if args.no_malloc_tuning else MALLOC_ENV}
    sections = {"peak": lambda: section_peak(args), "speed": lambda: section_speed(args),
                "remat": lambda: section_remat(args), "knobs": lambda: section_knobs(args),
                "chunks": lambda: section_chunks(args),
                "attention": lambda: section_attention(args), "memory": lambda: section_memory(args),
                "longest": lambda: section_longest(args), "seq1024": lambda: section_seq1024(args)}
    start = time.perf_counter()
    for name in args.sections:
        print(f"== {name}", flush=True)
        section_start = time.perf_counter()
        results[name] = sections[name]()
        results[name + "_wall_s"] = time.perf_counter() - section_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(summarize(results)))
    print(f"total {time.perf_counter() - start:.0f}s; results in {out_path}")


if __name__ == "__main__":
    main()
