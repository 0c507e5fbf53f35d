"""Cost of the published schemes (docs/maths.md C, C5-C8 the newer ones) against `standard`: the real training step
(jax_residual.train.step, AdamW included) of each, timed interleaved in one process, next to
the FLOP ratio of the counter training logs (train/flops.py).

    python benchmarks/bench_schemes.py --preset small --batch-size 16 --seq-len 128 --rounds 5

Prints one markdown row per method: FLOPs/token x standard, median step ms, time x standard,
the layer scan's carry (the residual stream in the scheme's layout plus its state fields, one
copy: what the scan holds between layers) and XLA's temp buffers of the compiled step.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import interleaved_medians, machine_info  # noqa: E402

from jax_residual import LlamaForCausalLM  # noqa: E402
from jax_residual.sharding import make_mesh  # noqa: E402
from jax_residual.stack import carry_fields, initial_state  # noqa: E402
from jax_residual.train import flops, optim, step  # noqa: E402
from jax_residual.train.run_config import RunConfig, model_config  # noqa: E402

VARIANTS = {"standard": {}, "denseformer": {}, "denseformer 2x2": {"dense_dilation": 2, "dense_period": 2},
            "value_residual": {}, "hyper_connections": {}, "hyper_connections dynamic": {"hc_dynamic": True},
            "mhc": {}, "method5.2": {}, "mudd": {}, "mudd static": {"mudd_static": True}, "dca": {},
            "dca k=2": {"dca_k": 2}, "laurel": {}, "laurel rw+lr+pa": {"laurel_variant": "rw+lr+pa"},
            "attn_res": {}, "attn_res block2": {"attn_res_blocks": 2}}


def carry_bytes(cfg, batch: int, seq: int) -> int:
    """Bytes of the layer scan's carry for a [batch, seq] input: the stream as the scheme lays it
    out (e.g. [n, b, s, h] for hyper-connections) and every state field (stack.py)."""
    cfg = cfg.with_attention_state(batch, seq)
    x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.dtype(cfg.dtype))
    carry = jax.eval_shape(lambda x: (cfg.scheme.enter(x, cfg), initial_state(x, cfg, carry_fields(cfg))), x)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(carry))


def train_step_fn(run: RunConfig):
    """(a no-argument callable running one optimiser step of `run`'s model on a fixed batch,
    FLOPs per token, carry bytes, XLA temp bytes of the compiled step)."""
    cfg, mesh = model_config(run), make_mesh("data=1", jax.devices()[:1])
    tx = optim.make_optimizer(run.lr, run.warmup_steps, run.schedule_steps, run.weight_decay, run.grad_clip)
    shardings, _ = step.state_shardings(mesh, cfg, tx, run.seq_len)
    state = [step.init_state(step.init_params(cfg, 0, run.seq_len, shardings.params), tx, shardings)]
    train_step = step.make_train_step(LlamaForCausalLM(cfg, mesh=mesh), tx, shardings, mesh)
    tokens = np.random.default_rng(0).integers(0, 256, (1, run.batch_size, run.seq_len + 1), dtype=np.int32)
    batch = jax.device_put(tokens, step.stacked_batch_sharding(mesh))

    def one_step():
        state[0], out = train_step(state[0], batch)
        jax.block_until_ready(out)

    temp = train_step.lower(state[0], batch).compile().memory_analysis().temp_size_in_bytes
    return one_step, flops.flops_per_token(cfg, run.seq_len), carry_bytes(cfg, run.batch_size, run.seq_len), temp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    base = RunConfig(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len)
    names = args.methods.split(",")
    steps, per_token, carry, temp = {}, {}, {}, {}
    for name in names:
        run = base.replace(method=name.split()[0]).with_knobs(**VARIANTS[name])
        steps[name], per_token[name], carry[name], temp[name] = train_step_fn(run)
    timings = interleaved_medians(steps, args.rounds)
    reference = "standard" if "standard" in names else names[0]
    print(f"| method | FLOPs/token x {reference} | step ms (median of {args.rounds}) | time x {reference} "
          "| carry MiB | step temp MiB |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {per_token[name] / per_token[reference]:.3f} | {timings[name]['median_s'] * 1e3:.1f} | "
              f"{timings[name]['median_s'] / timings[reference]['median_s']:.3f} | {carry[name] / 2**20:.2f} "
              f"| {temp[name] / 2**20:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"machine": machine_info(), "args": vars(args),
                                                       "flops_per_token": per_token, "carry_bytes": carry,
                                                       "step_temp_bytes": temp, "timings": timings}, indent=1))


if __name__ == "__main__":
    main()
