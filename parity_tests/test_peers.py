"""The published schemes of docs/maths.md C (DenseFormer, value residual, hyper-connections, mHC):
JAX == torch_ref (logits, loss, gradients) with the connection weights moved off their init;
the identity initialisations equal `standard`; torch_ref's hyper-connection equals the
maintained `hyper-connections` package's on the same weights; weights, keys, knobs, export.

Tolerances are the twelve methods' (FP32_RTOL, GRAD_RTOL). Causality: test_causality.py.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from llama_testlib import (FP32_RTOL, GRAD_RTOL, SCHEME_PARAMS, SCHEME_VARIANTS, SEQ_LENS,
                           assert_close, assert_trees_close, jax_fns, jax_logits, normwise_error, numpy_state_dict,
                           random_ids, random_model, require_jax_model, tiny_config, to_jax_params,
                           torch_forward_backward)
from torch_ref.modeling import peers
from torch_ref.modeling.llama import ResidualLlamaForCausalLM

DIFFERENT = 1e-3  # "differs": normwise relative difference of logits above this
# The one exception to GRAD_RTOL: mhc's hc_dynamic_alpha gradient reaches A_r only through 20
# Sinkhorn-Knopp rounds, whose backward sums terms that cancel (the output is unchanged by adding
# a constant to a row or column of the input). Against a float64 run of torch_ref (its float32
# casts patched out), torch_ref's own float32 gradient of it is 1.1e-4 off at seq 6 (JAX: 6.4e-5)
# and 2.3e-5 at seq 11 (JAX: 3.5e-5); every other leaf is within GRAD_RTOL. So ~2x torch_ref's.
SINKHORN_GRAD_RTOL = 2.5e-4
IDENTITY_AT_INIT = [variant for variant in SCHEME_VARIANTS
                    if variant[0] in ("denseformer", "hyper_connections", "mudd", "dca", "laurel")]
# Drawn at random on each side (MUDDFormer's W1, irrelevant at init where W2 = 0): not compared.
RANDOM_INIT = {"mudd_w1"}


def variant_id(variant) -> str:
    method, knobs = variant
    return "-".join([method, *(f"{k}={v}" for k, v in knobs.items())])


def param_names(method: str, knobs: dict) -> tuple[str, ...]:
    """The variant's own SCHEME_PARAMS entry (its test id) where it has one, else its method's."""
    own = SCHEME_PARAMS.get(variant_id((method, knobs)))
    suffix = "+dynamic" if knobs.get("hc_dynamic") else "+static" if knobs.get("mudd_static") else ""
    return own or SCHEME_PARAMS[method + suffix]


def scheme_model(method: str, knobs: dict, seed: int, move: bool = True) -> ResidualLlamaForCausalLM:
    return random_model(tiny_config(**knobs), method, seed=seed, move_method_params=move)


# ----------------------------------------------------------------------------- JAX == torch_ref


@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("variant", SCHEME_VARIANTS, ids=variant_id)
def test_jax_matches_torch_logits_loss_grads(variant, seq):
    method, knobs = variant
    convert = require_jax_model()
    model = scheme_model(method, knobs, seed=1)  # connection weights moved off their init
    ids = random_ids(model.config, seq, seed=seq)
    loss_t, logits_t, grads_t = torch_forward_backward(model, ids)

    cfg, _, value_and_grad, _ = jax_fns(method, **knobs)
    (loss_j, logits_j), grads_j = value_and_grad(to_jax_params(model.state_dict(), cfg), ids.numpy())

    name = variant_id(variant)
    assert_close(logits_j, logits_t, FP32_RTOL, f"jax-vs-torch logits {name}")
    assert_close(loss_j, loss_t, FP32_RTOL, f"jax-vs-torch loss {name}")
    expected = nn.meta.unbox(convert.params_from_state_dict(grads_t, cfg))
    actual = nn.meta.unbox(grads_j)
    if method == "mhc":  # the projections read only through Sinkhorn-Knopp: see SINKHORN_GRAD_RTOL
        assert_close(actual["layers"].pop("hc_dynamic_alpha"), expected["layers"].pop("hc_dynamic_alpha"),
                     SINKHORN_GRAD_RTOL, f"jax-vs-torch grads {name} hc_dynamic_alpha")
    assert_trees_close(actual, expected, GRAD_RTOL, f"jax-vs-torch grads {name}")
    # the gradient reaches every connection weight in use: not layer 0's value mix, nor the DWA
    # weights of blocks without a DWA (period p: only blocks with (l + 1) % p == 0 have one)
    period = knobs.get("dense_period", 1)
    used = [l for l in range(4) if not (method == "value_residual" and l == 0) and (l + 1) % period == 0]
    for param in param_names(method, knobs):
        for l in used:
            assert np.abs(grads_t[f"model.layers.{l}.{param}"]).max() > 0, (param, l)


def test_schemes_are_distinct_from_each_other_and_from_standard():
    """Guards the parity test: on the same base weights the schemes compute different functions."""
    ids = random_ids(tiny_config(), SEQ_LENS[-1], seed=4)
    outputs = {"standard": scheme_model("standard", {}, seed=5)(ids).detach().numpy()}
    for variant in SCHEME_VARIANTS:
        with torch.no_grad():
            outputs[variant_id(variant)] = scheme_model(*variant, seed=5)(ids).numpy()
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert normwise_error(outputs[first], outputs[second]) > DIFFERENT, (first, second)


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("variant", IDENTITY_AT_INIT, ids=variant_id)
def test_identity_init_equals_standard(variant):
    """DenseFormer (alpha = identity), static / dynamic HC (A_m one-hot, A_r = I, B = 1, dynamic
    projections 0), MUDDFormer (b one-hot on the newest output, W2 = 0) and DCA (b = 1, w = 0)
    compute the standard model at their initialisation: torch_ref, and JAX with the connection
    weights of its own `model.init`, which equal torch_ref's (but for RANDOM_INIT draws)."""
    method, knobs = variant
    convert = require_jax_model()
    config = tiny_config(**knobs)
    ids = random_ids(config, SEQ_LENS[-1], seed=6)
    reference = random_model(config, "standard", seed=7)
    model = ResidualLlamaForCausalLM(config, method)  # connection weights at their init
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"model.layers.{l}.{p}" for l in range(4)
                                                 for p in param_names(method, knobs))
    with torch.no_grad():
        expected = reference(ids).numpy()
        assert_close(model(ids).numpy(), expected, 1e-6, f"torch init {variant_id(variant)}==standard")

    cfg, jax_model, _, _ = jax_fns(method, **knobs)
    init = jax.jit(jax_model.init)
    init_sd = convert.state_dict_from_params(nn.meta.unbox(init(jax.random.PRNGKey(0), ids.numpy())["params"]), cfg)
    torch_init = model.state_dict()
    method_keys = [f"model.layers.{l}.{p}" for l in range(4) for p in param_names(method, knobs)]
    for key in method_keys:
        if key.split(".")[-1] not in RANDOM_INIT:
            np.testing.assert_array_equal(init_sd[key], torch_init[key].numpy(), err_msg=key)
    state_dict = {**numpy_state_dict(reference), **{k: init_sd[k] for k in method_keys}}
    cfg_logits = jax_fns(method, **knobs)[2](to_jax_params(state_dict, cfg), ids.numpy())[0][1]
    assert_close(np.asarray(cfg_logits), jax_logits("standard", reference.state_dict(), ids), 1e-6,
                 f"jax init {variant_id(variant)}==standard")


@pytest.mark.parametrize("method", ["value_residual", "mhc"])
def test_schemes_without_identity_init_differ_from_standard_at_init(method):
    """ResFormer's lambda = (0.5, 0.5) and mHC's constrained matrices are not the identity: at
    their init they already differ from `standard` (so the test above is not vacuous for them)."""
    config = tiny_config()
    ids = random_ids(config, SEQ_LENS[-1], seed=6)
    reference = random_model(config, "standard", seed=7)
    model = ResidualLlamaForCausalLM(config, method)
    model.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        assert normwise_error(model(ids).numpy(), reference(ids).numpy()) > DIFFERENT


def test_hc_initial_matrices_follow_the_sublayer_index():
    """A_m = one-hot of sub-layer k = 2l + j mod n, A_r = I, B = 1 (n = 3: k mod 3 cycles)."""
    params = peers.hc_params(lambda config: False)(tiny_config(hc_expansion=3), 2)
    assert params["hc_alpha"].shape == (2, 3, 4)
    assert params["hc_alpha"][0, :, 0].tolist() == [0, 1, 0] and params["hc_alpha"][1, :, 0].tolist() == [0, 0, 1]
    assert torch.equal(params["hc_alpha"][:, :, 1:], torch.eye(3).expand(2, 3, 3))
    assert torch.equal(params["hc_beta"], torch.ones(2, 3))


# ----------------------------------------------------------------------------- the maintained package


@pytest.mark.parametrize("dynamic", [False, True])
def test_hyper_connection_matches_the_hyper_connections_package(dynamic):
    """torch_ref's sub-layer connection (peers.hc_matrices + peers.hyper_connection) equals
    `hyper_connections.HyperConnections` (lucidrains, PyPI) on the same weights.

    The package's parameters map onto ours: static_alpha = hc_alpha [n, n+1], static_beta =
    hc_beta, dynamic_alpha_fn / dynamic_beta_fn = hc_dynamic_alpha / hc_dynamic_beta,
    (dynamic_alpha_scale, dynamic_beta_scale) = hc_dynamic_scales, and its RMSNorm's gamma + 1 =
    hc_norm. One definition differs: its RMSNorm is x / ||x|| * sqrt(h) with no epsilon, ours
    x / sqrt(mean(x^2) + eps); the comparison uses eps = 0, where the two are the same function.

    Not compared: `mhc`. The package's ManifoldConstrainedHyperConnections drops the tanh of the
    dynamic terms, scales A_m, A_r and B by three separate factors, and ends each Sinkhorn round
    with the row normalisation of [A_r] (ours ends with the column one, so that every new stream
    is a convex combination of the old ones, the mHC paper's H_res row-stochastic last); see
    jax_residual/connections/.
    """
    hyper_connections = pytest.importorskip("hyper_connections")  # a test dependency (pyproject [test])
    n, h, b, s = 4, 32, 2, 5
    torch.manual_seed(0)
    package = hyper_connections.HyperConnections(n, dim=h, layer_index=1, tanh=True)
    with torch.no_grad():
        for parameter in package.parameters():
            parameter.copy_(parameter + 0.3 * torch.randn_like(parameter))
    branch = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.Tanh())
    streams = torch.randn(b, n, s, h)  # the package stacks streams inside the batch: (b n) s h

    branch_input, add_residual = package(streams.reshape(b * n, s, h))
    expected = add_residual(branch(branch_input)).reshape(b, n, s, h)

    layer = types.SimpleNamespace(hc_alpha=package.static_alpha[None], hc_beta=package.static_beta[None])
    if dynamic:
        layer.hc_dynamic_alpha = package.dynamic_alpha_fn[None]
        layer.hc_dynamic_beta = package.dynamic_beta_fn[None]
        layer.hc_norm = (package.norm.gamma + 1)[None]
        layer.hc_dynamic_scales = torch.stack([package.dynamic_alpha_scale, package.dynamic_beta_scale])[None]
    else:
        with torch.no_grad():  # the package without its dynamic terms: static HC
            package.dynamic_alpha_scale.zero_()
            package.dynamic_beta_scale.zero_()
        branch_input, add_residual = package(streams.reshape(b * n, s, h))
        expected = add_residual(branch(branch_input)).reshape(b, n, s, h)
    ours_streams = list(streams.unbind(1))
    alpha, beta = peers.hc_matrices(layer, 0, ours_streams, types.SimpleNamespace(rms_norm_eps=0.0))
    ours = torch.stack(peers.hyper_connection(ours_streams, branch, alpha, beta), dim=1)
    assert_close(ours.detach().numpy(), expected.detach().numpy(), FP32_RTOL,
                 f"torch_ref hc vs hyper_connections package (dynamic={dynamic})")


def recording(layers, rope):
    """Stand-ins for torch_ref layers for peers.attn_res: the same sub-layers and queries, each
    sub-layer call appended to `calls` as (its input, its output)."""
    calls = []

    def record(sublayer):
        def call(y, *rope_arg):
            out = sublayer(y)
            calls.append((y, out))
            return out
        return call

    fakes = [types.SimpleNamespace(attn_res_queries=layer.attn_res_queries,
                                   attention_sublayer=record(lambda y, layer=layer: layer.attention_sublayer(y, rope)),
                                   mlp_sublayer=record(layer.mlp_sublayer)) for layer in layers]
    return fakes, calls


@pytest.mark.parametrize("knobs", [{}, {"attn_res_blocks": 2}], ids=["full", "block2"])
def test_attn_res_init_weighs_every_source_the_same(knobs):
    """Attention Residuals' stated init (Sec. 3.1): every pseudo-query 0, so the softmax over depth
    is uniform and each sub-layer's input is the MEAN of its sources (Full: the embeddings and
    the earlier outputs; Block: the completed block sums and the partial sum), not the standard
    residual stream (their sum). Every reader of the stream is an RMSNorm (the pre-norms, the
    final norm), blind to that 1 / count scale but for its epsilon: with rms_norm_eps = 0 the
    model at init IS `standard` (and differs from it through eps otherwise). JAX's `model.init`
    gives torch_ref's zeros."""
    config = tiny_config(**knobs)
    model = random_model(config, "attn_res", seed=8, move_method_params=False)
    ids = random_ids(config, SEQ_LENS[0], seed=9)
    layers, calls = recording(model.model.layers, model.model.rotary_emb)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        output = peers.attn_res(layers, x, model.model.rotary_emb, config)
    size = 1 if not knobs else 2 * 4 // knobs["attn_res_blocks"]
    outputs = [out for _, out in calls]
    for k, (given, _) in enumerate([*calls[1:], (output, None)], start=1):  # the input after sub-layer k-1
        complete, partial = divmod(k, size)
        sources = [x] + [sum(outputs[n * size:(n + 1) * size]) for n in range(complete)]
        sources += [sum(outputs[complete * size:k])] if partial else []
        assert_close(given.numpy(), torch.stack(sources).mean(0).numpy(), FP32_RTOL, f"attn_res init input {k}")

    convert = require_jax_model()
    cfg, jax_model, _, _ = jax_fns("attn_res", **knobs)
    init = jax.jit(jax_model.init)
    init_sd = convert.state_dict_from_params(nn.meta.unbox(init(jax.random.PRNGKey(0), ids.numpy())["params"]), cfg)
    for l in range(4):
        key = f"model.layers.{l}.attn_res_queries"
        np.testing.assert_array_equal(init_sd[key], model.state_dict()[key].numpy(), err_msg=key)
        assert not np.any(init_sd[key])

    exact = tiny_config(rms_norm_eps=0.0, **knobs)
    reference = random_model(exact, "standard", seed=8)
    at_init = ResidualLlamaForCausalLM(exact, "attn_res")
    at_init.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        expected = reference(ids).numpy()
        assert_close(at_init(ids).numpy(), expected, FP32_RTOL, "attn_res init (eps 0) == standard")
        assert normwise_error(model(ids).numpy(), random_model(config, "standard", seed=8)(ids).numpy()) > 0


@pytest.mark.parametrize("knobs", [{}, {"attn_res_blocks": 2}], ids=["full", "block2"])
def test_attn_res_inputs_match_the_attn_res_package(knobs):
    """torch_ref's Attention Residuals gives every sub-layer the input that `attn_res` (PyPI,
    kyegomez/attn_res, an implementation we did not write) computes with its own AttnResOperator
    (RMSNorm without scale, softmax over sources) and its own Full / Block schedule, on the same
    pseudo-queries and the same sub-layers.

    Mapping: the package gives sub-layer i its own operator; ours holds the query of the input
    after sub-layer i - 1 (layer (i-1)//2, slot (i-1)%2); sub-layer 0 reads the embeddings alone
    in both (one source: weight 1). Its Block mode counts `block_size` in sub-layers (2L / N).
    Not compared: the model output. The package returns the plain sum of the final sources (its
    comment: "could also use a final AttnRes operator"); ours aggregates them with one more
    pseudo-query, as the paper's output layer (checked against JAX above)."""
    attn_res = pytest.importorskip("attn_res")  # a test dependency (pyproject [test])
    config = tiny_config(**knobs)
    model = random_model(config, "attn_res", seed=12)  # queries moved off 0
    ids = random_ids(config, SEQ_LENS[0], seed=13)
    rope = model.model.rotary_emb
    layers, calls = recording(model.model.layers, rope)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        peers.attn_res(layers, x, rope, config)

    queries = [torch.zeros(config.hidden_size)] + [q for layer in model.model.layers for q in layer.attn_res_queries]
    functions = [f for layer in model.model.layers
                 for f in (lambda y, layer=layer: layer.attention_sublayer(y, rope), layer.mlp_sublayer)]
    seen = []

    def package_sublayer(i):
        operator = attn_res.AttnResOperator(config.hidden_size, eps=config.rms_norm_eps)
        with torch.no_grad():
            operator.pseudo_query.copy_(queries[i])

        def call(sources, rope_freqs, mask):
            seen.append(operator(sources))
            return functions[i](seen[-1])
        return call

    size = 1 if not knobs else 2 * 4 // knobs["attn_res_blocks"]
    package_model = types.SimpleNamespace(cfg=types.SimpleNamespace(block_size=size),
                                          layers=[package_sublayer(i) for i in range(len(functions))])
    forward = (attn_res.AttnResTransformer._forward_full_attnres if not knobs
               else attn_res.AttnResTransformer._forward_block_attnres)
    with torch.no_grad():
        forward(package_model, x, None, None)
    assert len(seen) == len(calls) == 8
    for i, ((ours, _), theirs) in enumerate(zip(calls, seen)):
        assert_close(ours.numpy(), theirs.numpy(), FP32_RTOL, f"torch_ref attn_res vs attn_res package input {i}")


# ----------------------------------------------------------------------------- LAuReL by hand


def test_laurel_matches_a_two_sublayer_example_worked_from_the_paper():
    """No maintained LAuReL implementation installs from PyPI (its `laurel` is an unrelated
    package; x-transformers has none), so torch_ref's LAuReL (rw+lr+pa, Sec. 2.1-2.4) is checked
    against the paper's equations worked in float64 numpy for one layer, i.e. two sub-layers
    f_0, f_1 (tanh maps here) with x_0 the embeddings:

        x_1 = alpha_0 f_0(x_0) + beta_0 (x_0 + B_0 A_0 x_0)
        x_2 = alpha_1 f_1(x_1) + beta_1 (x_1 + B_1 A_1 x_1) + gamma_{1,1} x_0
    """
    rng = np.random.default_rng(0)
    h, r = 8, 2
    x0 = rng.standard_normal((2, 3, h))
    w = rng.standard_normal((2, h, h)) / np.sqrt(h)
    scales, down, up = rng.uniform(0.5, 1.5, (2, 2)), rng.standard_normal((2, h, r)), rng.standard_normal((2, r, h))
    gammas = rng.standard_normal((2, 2))
    f = [lambda x, j=j: np.tanh(x @ w[j]) for j in range(2)]
    x1 = scales[0, 0] * f[0](x0) + scales[0, 1] * (x0 + x0 @ down[0] @ up[0])
    x2 = scales[1, 0] * f[1](x1) + scales[1, 1] * (x1 + x1 @ down[1] @ up[1]) + gammas[1, 0] * x0

    t = lambda a: torch.from_numpy(a)
    layer = types.SimpleNamespace(laurel_scales=t(scales), laurel_down=t(down), laurel_up=t(up), laurel_gammas=t(gammas),
                                  attention_sublayer=lambda y, rope: torch.tanh(y @ t(w[0])),
                                  mlp_sublayer=lambda y: torch.tanh(y @ t(w[1])))
    config = types.SimpleNamespace(laurel_variant="rw+lr+pa", laurel_rank=r, laurel_window=2)
    ours = peers.laurel([layer], t(x0), None, config).numpy()
    assert_close(ours, x2, 1e-12, "torch_ref laurel vs the paper's equations by hand")


# ----------------------------------------------------------------------------- keys, knobs, export


@pytest.mark.parametrize("variant", SCHEME_VARIANTS, ids=variant_id)
def test_state_dict_keys_round_trip_and_hf_export(variant, tmp_path):
    """HF keys + exactly the scheme's `model.layers.{l}.<weight>`; JAX's state_dict_from_params
    inverts params_from_state_dict, and an exported HF folder loads back with its knobs."""
    method, knobs = variant
    convert = require_jax_model()
    model = scheme_model(method, knobs, seed=11)
    sd = numpy_state_dict(model)
    hf_keys = set(numpy_state_dict(random_model(tiny_config(), "standard", seed=11)))
    assert set(sd) - hf_keys == {f"model.layers.{l}.{p}" for l in range(4) for p in param_names(method, knobs)}
    assert hf_keys <= set(sd)
    cfg = jax_fns(method, **knobs)[0]
    params = to_jax_params(sd, cfg)
    back = convert.state_dict_from_params(params, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)

    convert.save_hf_checkpoint(params, cfg, tmp_path)
    loaded_cfg, loaded = convert.load_hf_checkpoint(tmp_path, residual_method=method)
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(loaded), params)


def test_knob_of_another_method_or_out_of_range_is_a_clear_error():
    require_jax_model()
    from jax_residual.config import ModelConfig

    with pytest.raises(ValueError, match=r"dense_dilation=2 does not apply to 'hyper_connections'.*hc_expansion"):
        ModelConfig(residual_method="hyper_connections", knobs={"dense_dilation": 2})
    with pytest.raises(ValueError, match="hc_dynamic=True does not apply to 'mhc'"):
        ModelConfig(residual_method="mhc", knobs={"hc_dynamic": True})
    with pytest.raises(ValueError, match="dense_period must be >= 1, got 0"):
        ModelConfig(residual_method="denseformer", knobs={"dense_period": 0})
    with pytest.raises(ValueError, match="unknown residual method 'densformer'.*denseformer"):
        ResidualLlamaForCausalLM(tiny_config(), "densformer")


def test_connection_weights_are_replicated_float32_and_never_decayed():
    """Every scheme's weights: float32 under bf16 compute, replicated on a data x fsdp x tensor
    mesh, in the optimiser's no-decay "method" group and among the logged parameters."""
    require_jax_model()
    from jax_residual import LlamaForCausalLM, ModelConfig, sharding
    from jax_residual.train import loop, optim

    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    for method, knobs in SCHEME_VARIANTS:
        cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, residual_method=method, dtype="bfloat16",
                          knobs=knobs)
        names = set(param_names(method, knobs))
        abstract = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), np.zeros((2, 4), np.int32))
        specs = sharding.param_shardings(mesh, abstract)["params"]["layers"]
        params = nn.meta.unbox(abstract["params"])
        assert names <= set(params["layers"]), (method, names)
        labels = optim.param_labels(params)["layers"]
        for name in names:
            assert params["layers"][name].dtype == np.float32, name
            assert all(axis is None for axis in specs[name].spec), (name, specs[name].spec)
            assert labels[name] == "method", name
        assert labels["q_proj"] == "matrix" and not specs["q_proj"].is_fully_replicated
        assert set(loop.method_params(jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), params))) == names


def test_torch_ref_reads_the_same_knobs_with_the_same_defaults():
    """torch_ref (shipped inside exported folders, where jax_residual may be absent) writes its
    knob defaults down itself; they are the names and defaults the JAX families declare, so a
    config.json means the same model on both sides."""
    import dataclasses
    import inspect

    from jax_residual.connections import SCHEMES, knob_fields
    from torch_ref.hf import ResidualLlamaConfig
    from torch_ref.modeling.peers import KNOB_DEFAULTS

    declared = {name: field.default for name, field in knob_fields().items()}
    rerun_defaults = {name: inspect.signature(ResidualLlamaConfig).parameters[name].default
                      for name in ("rerun_window", "rerun_every", "rerun_keep_identity")}
    assert declared == KNOB_DEFAULTS | rerun_defaults
    for scheme in SCHEMES.values():  # every knob a scheme reads, torch_ref reads too
        assert {f.name for f in dataclasses.fields(scheme.knobs)} <= declared.keys()
