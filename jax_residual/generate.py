"""Sampling text from a model: one jitted program that fills a decoding cache with the prompt,
then extends it one token at a time (`LlamaForCausalLM(..., cache=...)`, see `DecodeCache`).

Each step runs only the new token through the layers: its logits equal those of the whole
sequence run at once (causality makes the cached positions final), for every method.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_residual import functional as F
from jax_residual.model import LlamaForCausalLM
from jax_residual.stores import empty_cache


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """logits [b, v] with every token outside the top-k, and outside the smallest set whose
    probability reaches top_p (nucleus), set to -inf. The most likely token always stays."""
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        better = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of the more likely tokens
        rank = jnp.argsort(order, axis=-1)
        logits = jnp.where(jnp.take_along_axis(better < top_p, rank, axis=-1), logits, -jnp.inf)
    return logits


def sample_token(logits, key, temperature: float, top_k: int | None, top_p: float | None):
    """Next ids [b] from logits [b, v]: argmax when temperature == 0, else a draw from
    softmax(filtered logits / temperature)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def check_sampling(vocab_size: int, prompt_len: int, max_new_tokens: int, temperature: float,
                   top_k: int | None, top_p: float | None):
    """ValueError naming the first bad sampling setting (the length is checked by the model)."""
    problems = [
        (prompt_len >= 1, f"the prompt must hold at least one token, got {prompt_len}"),
        (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (top_k is None or 1 <= top_k <= vocab_size, f"top_k must be in [1, {vocab_size}], got {top_k}"),
        (top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model: LlamaForCausalLM, params, prompt, key, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None):
    batch, prompt_len = prompt.shape
    cache = empty_cache(model.config, batch, prompt_len + max_new_tokens, jnp.dtype(model.config.dtype))
    logits, cache = model.apply({"params": params}, prompt, cache=cache)

    def step(carry, step_key):
        last_logits, cache = carry
        token = sample_token(last_logits, step_key, temperature, top_k, top_p)
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
        return (logits[:, -1], cache), token

    keys = jax.random.split(key, max_new_tokens)
    (last_logits, _), tokens = jax.lax.scan(step, (logits[:, -1], cache), keys[:-1])  # the last token needs no forward
    final = sample_token(last_logits, keys[-1], temperature, top_k, top_p)
    return jnp.concatenate([prompt, tokens.T, final[:, None]], axis=1)


def generate(model: LlamaForCausalLM, params, prompt, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0):
    """prompt int [b, p] -> [b, p + max_new_tokens]: the prompt and the sampled continuation.

    temperature 0 is greedy decoding; top_k / top_p restrict sampling to the k most likely
    tokens / the nucleus of probability top_p. The same seed gives the same tokens.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    cfg = model.config
    check_sampling(cfg.vocab_size, prompt.shape[-1], max_new_tokens, temperature, top_k, top_p)
    F.check_token_ids(prompt, cfg.vocab_size)
    return _generate(model, params, prompt, jax.random.key(seed), max_new_tokens, float(temperature), top_k, top_p)
