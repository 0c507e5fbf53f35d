"""Decoding speed: tokens/s of `jax_residual.generate` (a decoding cache, one new token per
step) against the same greedy loop without a cache (every step re-runs the whole sequence,
padded to its final length so one compiled program serves every step).

    python benchmarks/bench_generate.py                 # standard, method1, method2, method5.2
    python benchmarks/bench_generate.py --methods method1 --new-tokens 64

Both are timed in the same process, interleaved, after a compiling call; the table gives the
median over --rounds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

import jax_residual as jr
from jax_residual import generate as G


def uncached_greedy(model, params, prompt, new_tokens: int):
    """Greedy decoding by re-running the whole (padded) sequence at every step."""
    batch, prompt_len = prompt.shape
    total = prompt_len + new_tokens
    ids = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(ids, t):
        logits = model.apply({"params": params}, ids)
        token = jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)
        return ids.at[:, t].set(token), None

    return jax.lax.scan(step, ids, jnp.arange(prompt_len, total))[0]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="standard,method1,method2,method5.2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; {args.layers} layers x {args.hidden} hidden, batch {args.batch}, "
          f"prompt {args.prompt} + {args.new_tokens} new tokens, greedy")
    print("| method | cached tokens/s | uncached tokens/s | cached / uncached |\n|---|---|---|---|")
    for method in args.methods.split(","):
        cfg = jr.ModelConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=6, num_key_value_heads=2,
                             max_position_embeddings=args.prompt + args.new_tokens, residual_method=method)
        model = jr.LlamaForCausalLM(cfg)
        prompt = jax.random.randint(jax.random.key(0), (args.batch, args.prompt), 0, 256)
        params = nn.meta.unbox(model.init(jax.random.key(1), prompt)["params"])
        cached = lambda: G.generate(model, params, prompt, args.new_tokens, temperature=0.0)
        uncached = jax.jit(lambda p, ids: uncached_greedy(model, p, ids, args.new_tokens))
        assert (cached() == uncached(params, prompt)).all(), f"{method}: cached and uncached greedy decoding differ"
        times = {"cached": [], "uncached": []}
        for _ in range(args.rounds):
            times["cached"].append(timed(cached))
            times["uncached"].append(timed(uncached, params, prompt))
        tokens = args.batch * args.new_tokens
        cached_s, uncached_s = statistics.median(times["cached"]), statistics.median(times["uncached"])
        print(f"| {method} | {tokens / cached_s:,.0f} | {tokens / uncached_s:,.0f} | {uncached_s / cached_s:.2f}x |")


if __name__ == "__main__":
    main()
