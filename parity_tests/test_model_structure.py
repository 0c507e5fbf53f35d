"""Structure of the JAX model: depth does not unroll, the carried state is linear in sequence
length, implementation knobs (chunking, remat) leave the function unchanged, dtypes, RoPE
length rules and the README's "add a method" recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jax_residual as jr
from jax_residual.kernels import attention as A
from jax_residual import connections
from jax_residual.connections.rerun import Rerun
from jax_residual.connections.scores import SummedScores

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16)


def make(method="method1", layers=4, **changes):
    cfg = jr.ModelConfig(**SMALL, num_hidden_layers=layers, residual_method=method, **changes)
    return cfg, jr.LlamaForCausalLM(cfg)


def init_params(model, ids, seed=0):
    return nn.meta.unbox(model.init(jax.random.key(seed), ids)["params"])


def token_ids(batch=2, seq=9, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, SMALL["vocab_size"])


def loss_fn(model, ids):
    def loss(params):
        logits = model.apply({"params": params}, ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    return loss


@pytest.mark.parametrize("method, attention_state", [
    *((m, "qk") for m in ("method1", "method2", "method5.5", "denseformer", "value_residual", "hyper_connections", "mhc",
                          "mudd", "dca", "laurel", "attn_res")),
    *((m, "probs") for m in ("method1", "method2", "method5.5"))])
def test_hlo_does_not_grow_with_depth(method, attention_state):
    """The lowered train step of 8 and 32 layers differ only in array sizes, not in code.
    (Method 5 with "qk" lowers one attention per prefix length, 4 of them, which coincide below
    8 layers: 2 layers lower 15% less code.)"""
    ids = token_ids()
    sizes = []
    for layers in (8, 32):
        _, model = make(method, layers, recompute_chunk_size=2, attention_state=attention_state)
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
        sizes.append(len(jax.jit(jax.grad(loss_fn(model, ids))).lower(params).as_text()))
    assert abs(sizes[1] - sizes[0]) / sizes[0] < 0.02, sizes


@pytest.mark.parametrize("method", ["method1", "method4.2", "method5.3"])
def test_scan_carry_is_linear_in_sequence_length(method):
    """With attention_state="qk" the layer scan's carry (what is stored across layers) has no
    [.., s, s] array ("probs" is quadratic by design, see the next test)."""
    seq = 12
    ids = token_ids(seq=seq)
    _, model = make(method, attention_state="qk")
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params)
    layer_scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == 4]
    assert layer_scans, "the decoder stack is not one scan over the 4 layers"
    num_carry = layer_scans[0].params["num_carry"]
    num_consts = layer_scans[0].params["num_consts"]
    carry_shapes = [v.aval.shape for v in layer_scans[0].invars[num_consts:num_consts + num_carry]]
    assert any(len(shape) == 5 for shape in carry_shapes), carry_shapes  # the stored Q/K
    assert not any(shape[-2:] == (seq, seq) for shape in carry_shapes), carry_shapes


QK_STATE = {"stored_q": (4, 2, 12, 4, 8), "stored_k": (4, 2, 12, 2, 8)}


@pytest.mark.parametrize("method, state, budget, expected", [
    ("method5.3", "auto", None, {"score_sum": (2, 4, 12, 12)}),
    ("method5.3", "auto", 4 * 4 * 2 * 4 * 12 * 12, {"score_sum": (2, 4, 12, 12)}),  # exactly the budget
    ("method5.3", "auto", 4 * 4 * 2 * 4 * 12 * 12 - 1, QK_STATE),
    ("method1", "auto", None, QK_STATE),  # auto keeps Q/K where "probs" is an [L, ...] stack
    ("method5.5", "auto", None, QK_STATE),
    ("method1", "probs", None, {"stored_probs": (4, 2, 4, 12, 12)}),
    ("method5.5", "probs", None, {"stored_scores": (4, 2, 4, 12, 12)}),
])
def test_attention_state_is_chosen_from_shapes(method, state, budget, expected):
    """"auto" keeps the running score sum of 5.1-5.4 when L b nh s^2 float32 fits the budget,
    else Q/K, decided at trace time from the input's batch and sequence length (the scan
    carry's shapes); "probs" keeps torch_ref's [s, s] state for every method."""
    ids = token_ids(seq=12)
    changes = {} if budget is None else {"attention_state_budget_bytes": budget}
    _, model = make(method, attention_state=state, **changes)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params)
    carry_shapes = {v.aval.shape for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "custom_vjp_call")
                    for v in e.invars}
    assert set(expected.values()) <= carry_shapes, (expected, carry_shapes)


def test_bad_attention_state_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention_state 'pk'; expected one of"):
        jr.ModelConfig(attention_state="pk")
    with pytest.raises(ValueError, match="attention_state_budget_bytes must be >= 0"):
        jr.ModelConfig(attention_state_budget_bytes=-1)


@pytest.mark.parametrize("method, attention_state", [
    *((m, "qk") for m in ("method1", "method4.2", "method5.3", "method5.5", "denseformer", "value_residual",
                          "hyper_connections", "mudd", "dca")),
    *((m, "probs") for m in ("method1", "method4.2", "method5.3", "method5.5"))])
def test_chunking_and_remat_do_not_change_the_function(method, attention_state):
    """Loss and gradients equal across chunk sizes and remat policies (fp32, 1e-5 relative),
    in both attention states (5.3 in "probs" accumulates its scores: remat="layer" takes the
    checkpointed scan there)."""
    ids = token_ids()
    _, reference_model = make(method, remat="none", recompute_chunk_size=1, attention_state=attention_state)
    params = init_params(reference_model, ids)
    params["layers"] = {k: v + 0.1 * jax.random.normal(jax.random.key(3), v.shape) if k in connections.weight_names()
                        else v for k, v in params["layers"].items()}
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn(reference_model, ids)))(params)
    for chunk, remat in [(2, "recompute"), (4, "layer")]:
        _, model = make(method, remat=remat, recompute_chunk_size=chunk, attention_state=attention_state)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn(model, ids)))(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_bfloat16_compute_with_float32_params():
    """bf16 activations: params stay fp32, logits fp32 and within bf16 precision of fp32 ones."""
    ids = token_ids()
    _, model32 = make("method2")
    _, model16 = make("method2", dtype="bfloat16")
    params = init_params(model32, ids)
    logits32 = model32.apply({"params": params}, ids)
    logits16 = model16.apply({"params": params}, ids)
    assert logits16.dtype == jnp.float32
    assert jax.tree.leaves(jax.tree.map(lambda a: a.dtype == jnp.float32, params)) == [True] * len(jax.tree.leaves(params))
    # bf16 keeps 8 bits of mantissa: 2**-8 relative per op, a few ops deep.
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))


def test_long_sequence_needs_the_ntk_rule():
    """Longer than max_position_embeddings: a clear error, or (rope_dynamic_ntk) the smallest even
    NTK ratio covering it, i.e. exactly the model configured with that ratio."""
    ids = token_ids(seq=40)  # max_position_embeddings = 16 -> smallest even k with 16k >= 40 is 4
    _, strict = make("method1")
    params = init_params(strict, token_ids())
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        strict.apply({"params": params}, ids)
    _, dynamic = make("method1", rope_dynamic_ntk=True)
    _, ratio4 = make("method1", rope_ntk_ratio=4.0)
    _, ratio2 = make("method1", rope_ntk_ratio=2.0, rope_dynamic_ntk=True)
    expected = ratio4.apply({"params": params}, ids)
    np.testing.assert_array_equal(dynamic.apply({"params": params}, ids), expected)
    np.testing.assert_array_equal(ratio2.apply({"params": params}, ids), expected)


def test_readme_recipe_adds_a_method():
    """The README's method6 (decaying weights on re-run MLPs) is one function + one register()."""

    def decaying_weights(l, rerun, p):
        """rerun: boolean [L], the earlier layers i < l that layer l re-runs."""
        return jnp.where(rerun, 2.0 ** -(l - jnp.arange(rerun.shape[0])), 0.0)

    connections.register(Rerun(name="method6", sublayer="mlp", earlier_weights=decaying_weights))
    try:
        ids = token_ids()
        outputs = {}
        for method, layers in [("method6", 1), ("standard", 1), ("method6", 3), ("method1", 3)]:
            _, model = make(method, layers)
            outputs[method, layers] = model.apply({"params": init_params(model, ids)}, ids)
        # one layer: layer 0 is always standard (two programs: equal up to float32 rounding, 1e-6 of
        # the largest logit); three layers: the new rule is really used.
        standard = outputs["standard", 1]
        np.testing.assert_allclose(outputs["method6", 1], standard, rtol=1e-6, atol=1e-6 * float(np.abs(standard).max()))
        assert np.all(np.isfinite(outputs["method6", 3]))
        assert not np.allclose(outputs["method6", 3], outputs["method1", 3], atol=1e-4)
    finally:
        del connections.SCHEMES["method6"]


@pytest.mark.parametrize("method", ["method1", "method5.2"])
def test_attention_query_blocks_do_not_change_the_function(method, monkeypatch):
    """Blocked flash-style attention (unrolled causal blocks with a partial last block, blocks
    grown to stay unrolled, and the scan over > 16 blocks) equals one dense block, which the
    parity tests tie to torch_ref. Loss 1e-5 and gradients 1e-4 relative (fp32; the blocks sum
    in a different order)."""
    ids = token_ids(seq=20)  # > max_position_embeddings: every model takes NTK ratio 2
    _, dense = make(method, attention_block_size=None, rope_dynamic_ntk=True)
    params = init_params(dense, ids)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn(dense, ids)))(params)
    # 4 unrolled blocks (the last one 2 long); block 1 grown to 2 (10 unrolled); no growth: 20
    # blocks of 1 -> the scanned path
    for block, growth in ((6, A.MAX_BLOCK_GROWTH), (1, A.MAX_BLOCK_GROWTH), (1, 1)):
        monkeypatch.setattr(A, "MAX_BLOCK_GROWTH", growth)
        assert A.query_block(20, block) == {6: 6, 1: 2 if growth > 1 else 1}[block]
        _, model = make(method, attention_block_size=block, rope_dynamic_ntk=True)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn(model, ids)))(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_method_registered_later_gets_float32_weights_no_decay_and_logging():
    """A method with a learnable weight registered after import is treated like the built-in
    ones: its weight reaches the rules in float32 under bf16 compute, sits in the optimiser's
    no-decay group, and is among the logged method parameters."""
    from jax_residual.train import loop, optim

    seen_dtypes = []

    def decaying_scales(l, p, num_layers, head_dim):
        seen_dtypes.append(p["decay_rate"].dtype)
        return jnp.where(jnp.arange(num_layers) <= l, p["decay_rate"] ** (l - jnp.arange(num_layers)), 0.0) * head_dim**-0.5

    rate = connections.Weight(lambda cfg: np.full((cfg.num_hidden_layers,), 0.5, np.float32), axes=())
    connections.register(SummedScores(name="method7", score_scales=decaying_scales, weights={"decay_rate": rate}))
    try:
        ids = token_ids()
        _, model = make("method7", 3, dtype="bfloat16")
        params = init_params(model, ids)
        assert params["layers"]["decay_rate"].dtype == jnp.float32
        model.apply({"params": params}, ids)
        assert seen_dtypes and all(d == jnp.float32 for d in seen_dtypes), seen_dtypes
        labels = optim.param_labels(params)
        assert labels["layers"]["decay_rate"] == "method" and labels["layers"]["q_proj"] == "matrix"
        assert list(loop.method_params(params)) == ["decay_rate"]
    finally:
        del connections.SCHEMES["method7"]
