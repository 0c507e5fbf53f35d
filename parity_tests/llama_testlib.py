"""Shared helpers of the model-level parity tests (test_methods, test_hf_llama, test_causality).

* tiny configs and seeded random weights for `torch_ref.ResidualLlamaForCausalLM`;
* torch forward/backward (logits, mean next-token cross-entropy, parameter gradients);
* the JAX side, jitted once per (method, tie, layers) and cached for the whole session
  (jit itself caches per input shape), so every test file reuses the same compilations;
* an independent float64 numpy implementation of docs/maths.md B (`numpy_logits`);
* tolerance checks that record the errors they saw (written as JSON at exit when
  PARITY_ERRORS_JSON is set, for reports).

Tolerances: float32 everywhere, jax_default_matmul_precision="highest" (conftest). Errors are
measured normwise per tensor: max|actual - expected| / max|expected|.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from torch_ref.modeling.llama import ResidualLlamaForCausalLM

# Written out here, not imported from either implementation, so a method missing on one side fails.
METHODS = ("standard", "method1", "method2", "method3.1", "method3.2", "method4.1", "method4.2",
           "method5.1", "method5.2", "method5.3", "method5.4", "method5.5")
METHOD_PARAM = {"method3.2": "residual_weight_logits", "method4.2": "residual_weight_logits",
                "method5.4": "score_exponents", "method5.5": "score_weights"}
# The published schemes of docs/maths.md C and D, and the variants the tests run: (method, knobs). The knobs
# go into the HF config (torch_ref reads them there; ModelConfig.from_hf takes them over).
SCHEMES = ("denseformer", "value_residual", "hyper_connections", "mhc", "mudd", "dca", "laurel", "attn_res")
SCHEME_VARIANTS = (("denseformer", {}), ("denseformer", {"dense_dilation": 2, "dense_period": 2}),
                   ("value_residual", {}), ("hyper_connections", {}), ("hyper_connections", {"hc_dynamic": True}),
                   ("hyper_connections", {"hc_expansion": 3, "hc_dynamic": True}), ("mhc", {}),
                   ("mudd", {}), ("mudd", {"mudd_static": True, "mudd_streams": "vr"}),
                   ("dca", {}), ("dca", {"dca_k": 1}),
                   ("laurel", {}), ("laurel", {"laurel_variant": "rw+lr+pa", "laurel_rank": 2}),
                   ("attn_res", {}), ("attn_res", {"attn_res_blocks": 2}))
SCHEME_PARAMS = {"denseformer": ("dense_weights",), "value_residual": ("value_lambdas",),
                 "hyper_connections": ("hc_alpha", "hc_beta"),
                 "hyper_connections+dynamic": ("hc_alpha", "hc_beta", "hc_norm", "hc_dynamic_alpha",
                                               "hc_dynamic_beta", "hc_dynamic_scales"),
                 "mhc": ("hc_alpha", "hc_beta", "hc_norm", "hc_dynamic_alpha", "hc_dynamic_beta",
                         "hc_dynamic_scales"),
                 "mudd": ("mudd_bias", "mudd_w1", "mudd_w2"), "mudd+static": ("mudd_bias",),
                 "dca": ("dca_w", "dca_bias"),
                 # a variant whose weights differ from its method's default has its own entry (its test id)
                 "laurel": ("laurel_scales", "laurel_down", "laurel_up"),
                 "laurel-laurel_variant=rw+lr+pa-laurel_rank=2": ("laurel_scales", "laurel_down", "laurel_up",
                                                                  "laurel_gammas"),
                 "attn_res": ("attn_res_queries",)}
LEARNABLE = set(METHOD_PARAM.values()) | {name for names in SCHEME_PARAMS.values() for name in names}
BATCH, SEQ_LENS = 2, (6, 11)
FP32_RTOL = 1e-5  # fp32 on both sides, highest matmul precision: ~1e-5 normwise relative
# Parameter gradients pass through ~3x more float32 operations (backward of L layers and of the
# re-runs of earlier layers). Worst seen 2.3e-5: q_proj of method1 with rerun_window=2
# (test_rerun_knobs), where a float64 run of torch_ref (its float32 casts patched out) put
# torch_ref's own float32 gradient 1.8e-5 from it and JAX's 4.3e-6. So ~2x that.
GRAD_RTOL = 4e-5


def stdlib_corpus(folder, validation: int = 2, train: int = 12):
    """`folder` filled with standard-library sources, real text that prepares quickly: the first
    ones, in sorted order, until `validation` fall in the validation split (by prepare's hash) and
    `train` in train (test-split files skipped). Returns the folder."""
    from jax_residual import prepare
    from jax_residual.data import sources

    counts = {"train": 0, "validation": 0, "test": 0}
    wanted = {"train": train, "validation": validation, "test": 0}
    for source in sources.stdlib_sources(sources.stdlib_root()):
        content = source.read_bytes()
        split = prepare.split_of(content, prepare.VALIDATION_FRACTION, prepare.TEST_FRACTION)
        if counts[split] < wanted[split]:
            (folder / source.name).write_bytes(content)
            counts[split] += 1
        if counts == wanted:
            return folder
    raise AssertionError(f"the standard library has too few sources: {counts}")


def tiny_config(tie: bool = False, layers: int = 4, **overrides) -> transformers.LlamaConfig:
    """vocab 64, hidden 32, 4 query heads / 2 kv heads (GQA, hd 8), intermediate 64."""
    values = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                  rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=tie,
                  attn_implementation="eager")
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def random_ids(config, seq: int, seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_base_weights(model: torch.nn.Module, seed: int) -> None:
    """Every non-method parameter, drawn in state-dict order from one seeded generator.

    Linears ~ N(0, 0.2) (attention far from uniform), embedding ~ N(0, 1), norm gammas ~
    U(0.5, 1.5) (so a misplaced gamma shows). Identical for every method given the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.split(".")[-1] in LEARNABLE:
            continue
        if "norm" in name:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))
        elif "embed_tokens" in name:
            p.copy_(torch.empty(p.shape).normal_(0.0, 1.0, generator=generator))
        else:
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.2, generator=generator))


@torch.no_grad()
def randomize_method_params(model: torch.nn.Module, seed: int) -> None:
    """Move the learnable method parameters away from their initial values."""
    generator = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        kind = name.split(".")[-1]
        if kind == "residual_weight_logits":
            p.copy_(torch.empty(p.shape).normal_(0.0, 1.0, generator=generator))
        elif kind == "score_exponents":  # (a, b) around the initial (0.5, 0.5)
            p.copy_(torch.stack([torch.empty(()).uniform_(0.3, 0.7, generator=generator),
                                 torch.empty(()).uniform_(0.2, 0.8, generator=generator)]))
        elif kind == "score_weights":
            p.copy_(torch.empty(p.shape).uniform_(0.2, 1.2, generator=generator))
        elif kind in ("dense_weights", "hc_alpha", "hc_beta"):  # around the identity / Pre-Norm init
            p.add_(torch.empty(p.shape).normal_(0.0, 0.3, generator=generator))
        elif kind == "value_lambdas":
            p.copy_(torch.empty(p.shape).uniform_(0.2, 0.8, generator=generator))
        elif kind in ("hc_norm", "hc_dynamic_scales"):  # norm scales around 1; tanh scales large enough to matter
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator) if kind == "hc_norm"
                    else torch.empty(p.shape).uniform_(0.1, 0.5, generator=generator))
        elif kind in ("hc_dynamic_alpha", "hc_dynamic_beta", "mudd_w1", "mudd_w2", "dca_w"):
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.3, generator=generator))
        elif kind in ("mudd_bias", "dca_bias"):  # around the one-hot / the ones
            p.add_(torch.empty(p.shape).normal_(0.0, 0.3, generator=generator))
        elif kind == "laurel_scales":  # alpha, beta around 1
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))
        elif kind in ("laurel_down", "laurel_up", "laurel_gammas"):  # around the identity columns / zeros
            p.add_(torch.empty(p.shape).normal_(0.0, 0.3, generator=generator))
        elif kind == "attn_res_queries":  # logits w·RMSNorm(v) of spread ~0.3 sqrt(h): far from uniform weights
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.3, generator=generator))


def random_model(config, method: str, seed: int = 0, move_method_params: bool = True):
    model = ResidualLlamaForCausalLM(config, method)
    randomize_base_weights(model, seed)
    if move_method_params:
        randomize_method_params(model, seed)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- torch side


def next_token_loss_torch(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, t+1] from logits[:, t]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def torch_forward_backward(model, ids):
    """Returns (loss float, logits np [b, s, v], grads {state-dict key: np}).

    Tied weights: both keys carry the gradient of the one shared tensor. Parameters that do
    not reach the loss (method parameters of layer 0) get a zero gradient.
    """
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = next_token_loss_torch(logits, ids)
    loss.backward()
    grads = {name: (torch.zeros_like(p) if p.grad is None else p.grad).numpy().copy()
             for name, p in model.named_parameters(remove_duplicate=False)}
    return float(loss.detach()), logits.detach().numpy(), grads


# ----------------------------------------------------------------------------- JAX side


def require_jax_model():
    """Import the JAX model and its converter; a missing piece fails the test (never skips)."""
    import jax_residual.convert as convert
    import jax_residual.model  # noqa: F401

    return convert


def jax_config(hf_config, method: str, **overrides):
    import jax_residual

    config_cls = getattr(jax_residual, "ModelConfig", None)
    if config_cls is None:
        from jax_residual.config import ModelConfig as config_cls
    return config_cls.from_hf(hf_config, residual_method=method, **overrides)


def jax_model_cls():
    import jax_residual

    model_cls = getattr(jax_residual, "LlamaForCausalLM", None)
    if model_cls is None:
        from jax_residual.model import LlamaForCausalLM as model_cls
    return model_cls


_JAX_CACHE: dict = {}
# JAX_RESIDUAL_OPTIMIZED=1: compile with XLA's defaults (the `optimized` CI run; conftest.py).
OPTIMIZED = os.environ.get("JAX_RESIDUAL_OPTIMIZED") == "1"


def subprocess_env() -> dict:
    """Environment of a command-line subprocess: the session's (its compilation cache, its XLA
    compiler settings, conftest.py) without the 8 simulated devices, which each command asks
    for itself (--mesh) or not at all."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS=str(not OPTIMIZED).lower())
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count="))
    return env


def in_process(main, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command line's `main` (the trainer, export, sample,
    prepare), called in this process: what `python -m ...` runs, without an interpreter start-up."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def jax_fns(method: str, tie: bool = False, layers: int = 4, **overrides):
    """(model_config, model, value_and_grad, embeds_grad) for tiny_config(tie, layers), cached;
    `overrides`: ModelConfig fields beyond the HF config (remat, rerun_window, ...).

    value_and_grad(params, ids) -> ((loss, logits), grads w.r.t. params)
    embeds_grad(params, embeds [b, s, h], weights [b, s, v]) -> d sum(weights * logits) / d embeds
    """
    key = (method, tie, layers, tuple(sorted(overrides.items())))
    if key not in _JAX_CACHE:
        import jax
        import jax.numpy as jnp

        cfg = jax_config(tiny_config(tie=tie, layers=layers), method, **overrides)
        model = jax_model_cls()(cfg)

        def loss_fn(params, ids):
            logits = model.apply({"params": params}, ids)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            loss = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
            return loss, logits

        def weighted_logits(embeds, params, weights):
            return jnp.sum(model.apply({"params": params}, None, inputs_embeds=embeds) * weights)

        _JAX_CACHE[key] = (
            cfg,
            model,
            jax.jit(jax.value_and_grad(loss_fn, has_aux=True)),
            jax.jit(lambda params, embeds, weights: jax.grad(weighted_logits)(embeds, params, weights)),
        )
    return _JAX_CACHE[key]


def to_jax_params(state_dict, cfg):
    """HF/torch_ref state dict (tensors or numpy) -> unboxed Flax params."""
    from flax import linen as nn

    convert = require_jax_model()
    numpy_sd = {k: (v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state_dict.items()}
    return nn.meta.unbox(convert.params_from_state_dict(numpy_sd, cfg))


@functools.cache
def jax_forward(method: str, tie: bool = False, layers: int = 4, **overrides):
    """(model_config, forward) of jax_fns's model, cached: forward = jax.jit(model.apply), no
    backward pass compiled for the tests that only read logits."""
    import jax

    cfg, model, _, _ = jax_fns(method, tie, layers, **overrides)
    return cfg, jax.jit(model.apply)


def jax_logits(method: str, state_dict, ids, tie: bool = False, layers: int = 4) -> np.ndarray:
    """JAX logits [b, s, v] of a torch_ref/HF state dict on ids [b, s]."""
    cfg, forward = jax_forward(method, tie, layers)
    return np.asarray(forward({"params": to_jax_params(state_dict, cfg)}, np.asarray(ids)))


# ----------------------------------------------------------------------------- comparisons

ERRORS: dict[str, float] = {}


def _dump_errors():
    path = os.environ.get("PARITY_ERRORS_JSON")
    if path and ERRORS:
        with open(path, "w") as f:
            json.dump(ERRORS, f, indent=1, sort_keys=True)


atexit.register(_dump_errors)


def normwise_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def assert_close(actual, expected, rtol: float, what: str) -> float:
    """max|actual - expected| <= rtol * max|expected|; records the error under `what`."""
    error = normwise_error(actual, expected)
    ERRORS[what] = max(error, ERRORS.get(what, 0.0))
    abs_error = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)), initial=0.0))
    assert error <= rtol, f"{what}: normwise relative error {error:.3g} > {rtol:g} (max abs error {abs_error:.3g})"
    return error


def assert_trees_close(actual, expected, rtol: float, what: str) -> float:
    """Leaf-by-leaf assert_close of two pytrees with the same structure; returns the worst error."""
    import jax

    flat_actual = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(actual)[0]}
    flat_expected = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert flat_actual.keys() == flat_expected.keys(), (
        f"{what}: tree paths differ: only in actual {sorted(flat_actual.keys() - flat_expected.keys())}, "
        f"only in expected {sorted(flat_expected.keys() - flat_actual.keys())}")
    worst, failures = 0.0, []
    for path, expected_leaf in flat_expected.items():
        error = normwise_error(flat_actual[path], expected_leaf)
        worst = max(worst, error)
        if error > rtol:
            failures.append(f"{path}: {error:.3g}")
    ERRORS[what] = max(worst, ERRORS.get(what, 0.0))
    assert not failures, f"{what}: leaves over normwise rtol {rtol:g}: " + ", ".join(failures)
    return worst


# ----------------------------------------------------------------------------- numpy reference
# docs/maths.md B as a table: a method is (its pre-mask attention logits from the raw scores
# S_0..S_l, the sub-layer whose residual re-runs earlier layers, their weights w_{l,i}). Layer 0
# and every method not listed use the standard rule. A new method adds an entry, not a branch.


def _standard_logits(scores, m, hd, w):
    return scores[-1] / math.sqrt(hd)


def _summed_logits(divisor):
    return lambda scores, m, hd, w: sum(scores) / divisor(m, hd, w)


def _weighted_logits(scores, m, hd, w):
    return sum(c * s for c, s in zip(w("score_weights")[:m], scores)) / math.sqrt(hd)


def _ones(l, w):
    return np.ones(l)


def _uniform(l, w):
    return np.full(l, 1.0 / l)


def _softmax_weights(l, w):
    alpha = w("residual_weight_logits")[:l]
    return np.exp(alpha - alpha.max()) / np.exp(alpha - alpha.max()).sum()


NUMPY_RULES = {  # method -> (logits(scores, m, hd, w), re-run sub-layer or None, weights(l, w))
    "standard": (_standard_logits, None, None),
    "method1": (_standard_logits, "mlp", _ones),
    "method2": (_standard_logits, "attention", _ones),
    "method3.1": (_standard_logits, "mlp", _uniform),
    "method3.2": (_standard_logits, "mlp", _softmax_weights),
    "method4.1": (_standard_logits, "attention", _uniform),
    "method4.2": (_standard_logits, "attention", _softmax_weights),
    "method5.1": (_summed_logits(lambda m, hd, w: math.sqrt(hd)), None, None),
    "method5.2": (_summed_logits(lambda m, hd, w: math.sqrt(hd) * math.sqrt(m)), None, None),
    "method5.3": (_summed_logits(lambda m, hd, w: math.sqrt(hd) * m), None, None),
    "method5.4": (_summed_logits(lambda m, hd, w: hd ** w("score_exponents")[0] * m ** w("score_exponents")[1]),
                  None, None),
    "method5.5": (_weighted_logits, None, None),
}


def numpy_logits(state_dict, config, method: str, ids) -> np.ndarray:
    """docs/maths.md B in float64 numpy, straight from the state dict (independent of both models)."""
    sd = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, np.float64) for k, v in state_dict.items()}
    ids = np.asarray(ids)
    b, s = ids.shape
    L, nh, nkv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    hd, eps = config.hidden_size // nh, config.rms_norm_eps
    theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
    mask = np.tril(np.ones((s, s), bool))

    def w(l, name):
        return sd[f"model.layers.{l}.{name}"]

    def rms(x, gamma):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * gamma

    inv_freq = theta ** (-np.arange(0, hd, 2) / hd)
    angles = np.arange(s)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(x):  # [b, s, n, hd]
        rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    def split(y, weight, n):  # -> [b, s, n, hd]
        return (y @ weight.T).reshape(b, s, n, hd)

    def per_query_head(t):  # [b, s, nkv, hd] -> [b, nh, s, hd], query head j reads kv head j // (nh/nkv)
        return np.repeat(t.transpose(0, 2, 1, 3), nh // nkv, axis=1)

    def softmax(z):
        z = np.where(mask, z, -np.inf)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def attend(l, p, y):  # o_proj(heads(P V(y)))
        o = p @ per_query_head(split(y, w(l, "self_attn.v_proj.weight"), nkv))
        return o.transpose(0, 2, 1, 3).reshape(b, s, nh * hd) @ w(l, "self_attn.o_proj.weight").T

    def mlp(l, y):
        g, u = y @ w(l, "mlp.gate_proj.weight").T, y @ w(l, "mlp.up_proj.weight").T
        return (g / (1 + np.exp(-g)) * u) @ w(l, "mlp.down_proj.weight").T

    def n1(l, x):
        return rms(x, w(l, "input_layernorm.weight"))

    def n2(l, x):
        return rms(x, w(l, "post_attention_layernorm.weight"))

    P, S = [], []

    def a_tilde(i, x):
        return attend(i, P[i], n1(i, x))

    def m_tilde(i, x):
        return mlp(i, n2(i, x + a_tilde(i, x)))

    x = sd["model.embed_tokens.weight"][ids]
    for l in range(L):
        logits_rule, rerun, weights_rule = NUMPY_RULES[method if l > 0 else "standard"]
        layer_weight = lambda name, l=l: w(l, name)
        y = n1(l, x)
        q = rope(split(y, w(l, "self_attn.q_proj.weight"), nh)).transpose(0, 2, 1, 3)
        k = per_query_head(rope(split(y, w(l, "self_attn.k_proj.weight"), nkv)))
        S.append(q @ k.swapaxes(-1, -2))
        P.append(softmax(logits_rule(S, l + 1, hd, layer_weight)))
        a = attend(l, P[l], y)
        weights = weights_rule(l, layer_weight) if rerun else None
        h = a + sum(weights[i] * a_tilde(i, x) for i in range(l)) if rerun == "attention" else x + a
        mlp_out = mlp(l, n2(l, h))
        x = mlp_out + sum(weights[i] * m_tilde(i, x) for i in range(l)) if rerun == "mlp" else h + mlp_out
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(x, sd["model.norm.weight"]) @ head.T
