"""Sharding on real (simulated CPU) devices.

* The vocabulary-parallel embedding (docs/maths.md A3): the table is sharded along the
  vocabulary, each shard looks up and zeroes, a psum completes it. Checked against the w torch
  ParallelVocabEmbedding ranks and a single-device VocabEmbedding.
* The whole model on a data=2, fsdp=2, tensor=2 mesh: the compiled logits and the layer scan's
  stored-Q/K carry are laid out as sharding.py's rules declare, and the loss, logits and
  gradients equal the single-device model's.

Tolerances: lookups and a psum of one row with zeros are exact -> forward bitwise equal.
Table gradients are scatter-adds whose order may differ: float32 rtol = atol = 1e-5;
bfloat16 rtol = atol = 2e-2 (one bf16 ulp is 2**-8 relative). The sharded model sums in
another order than one device: float32 normwise FP32_RTOL (1e-5).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_residual as jr
import torch_ref as tr
from jax_residual import stack
from jax_residual import sharding
from jax_residual.convert import as_numpy, parallel_embedding_params_to_torch
from jax_residual.connections import get_method
from jax_residual.stores import attention_store
from jax_residual.sharding import make_mesh
from llama_testlib import FP32_RTOL, assert_close, assert_trees_close, jax_config, random_model, tiny_config, to_jax_params

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}
VOCAB, EMB = 48, 8
MESHES = [("tensor=8", None), ("data=2,tensor=4", ("data",))]


def random_ids(shape, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape, dtype=np.int64)


def sharded_forward_and_grad(module, table, ids, cotangent):
    """out [b, s, e] and d<out, cotangent>/d table, through the shard_map'd module."""
    def projection(table):
        out = module.apply({"params": {"embedding": table}}, ids)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grad = jax.jit(jax.value_and_grad(projection, has_aux=True))(table)
    return out, grad


def torch_ranks_forward_and_grad(rank_modules, ids, cotangent):
    """The all-reduce by hand: sum of the w rank outputs; the gradient of each rank's table."""
    out = sum(module(torch.from_numpy(ids)) for module in rank_modules)
    (out.float() * torch.from_numpy(cotangent)).sum().backward()
    return out, torch.cat([module.weight.grad for module in rank_modules])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_spec, batch_axes", MESHES)
def test_sharded_embedding_matches_torch_ranks_and_single_device(mesh_spec, batch_axes, dtype):
    mesh = make_mesh(mesh_spec)
    world_size = mesh.shape["tensor"]
    module = jr.ParallelVocabEmbedding(VOCAB, EMB, mesh, batch_axes=batch_axes, param_dtype=DTYPES[dtype][1])
    ids = random_ids((4, 6), seed=0)
    ids_before = ids.copy()
    cotangent = np.random.default_rng(1).normal(size=(4, 6, EMB)).astype(np.float32)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), ids))["params"]
    table = params["embedding"]

    # the table really lives in w vocabulary blocks, one per tensor-axis device
    assert table.sharding.is_equivalent_to(NamedSharding(mesh, P("tensor", None)), table.ndim)
    assert table.sharding.shard_shape(table.shape) == (VOCAB // world_size, EMB)

    rank_modules = [tr.ParallelVocabEmbedding(VOCAB, EMB, rank, world_size, dtype=DTYPES[dtype][0])
                    for rank in range(world_size)]
    for rank_module, state in zip(rank_modules, parallel_embedding_params_to_torch(params, world_size)):
        rank_module.load_state_dict(state)

    out, grad = sharded_forward_and_grad(module, table, ids, cotangent)
    torch_out, torch_grad = torch_ranks_forward_and_grad(rank_modules, ids, cotangent)
    single_device = jr.VocabEmbedding(VOCAB, EMB).apply({"params": {"embedding": np.asarray(table)}}, ids)

    assert out.dtype == DTYPES[dtype][1]
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axes, None, None)), out.ndim)
    np.testing.assert_array_equal(as_numpy(out), as_numpy(torch_out))
    np.testing.assert_array_equal(as_numpy(out), as_numpy(single_device))
    np.testing.assert_allclose(as_numpy(grad).astype(np.float32), as_numpy(torch_grad).astype(np.float32),
                               **TOL[dtype])
    np.testing.assert_array_equal(ids, ids_before)


@functools.cache
def jitted_init(init_base_seed):
    """The jitted init of a ParallelVocabEmbedding over 'tensor=8' (compiled once per seed)."""
    return jax.jit(jr.ParallelVocabEmbedding(VOCAB, EMB, make_mesh("tensor=8"), init_base_seed=init_base_seed).init)


def rank_blocks(init_base_seed, rng_seed=0):
    """The 8 vocabulary blocks [VOCAB/8, EMB] of an initialised sharded table."""
    table = nn.unbox(jitted_init(init_base_seed)(jax.random.key(rng_seed), np.zeros((1, 1), np.int32)))
    return np.split(np.asarray(table["params"]["embedding"]), 8)


def test_rank_blocks_are_seeded_base_plus_rank():
    for rank, block in enumerate(rank_blocks(init_base_seed=20)):
        vocab_block = jr.VocabEmbedding(VOCAB // 8, EMB, init_seed=20 + rank)
        expected = nn.unbox(vocab_block.init(jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]["embedding"]
        np.testing.assert_array_equal(block, np.asarray(expected))
    np.testing.assert_array_equal(np.concatenate(rank_blocks(20, rng_seed=1)), np.concatenate(rank_blocks(20)))


def test_init_base_seed_none_uses_params_rng():
    blocks = rank_blocks(None, rng_seed=3)
    np.testing.assert_array_equal(np.concatenate(rank_blocks(None, rng_seed=3)), np.concatenate(blocks))
    assert not np.allclose(np.concatenate(rank_blocks(None, rng_seed=4)), np.concatenate(blocks))
    assert not np.allclose(blocks[0], blocks[1])


def small_sharded_lookup(mesh_spec="tensor=8", batch_axes=None):
    """(module, params) with table rows 0 .. VOCAB-1 holding 1 .. VOCAB (never a zero row)."""
    module = jr.ParallelVocabEmbedding(VOCAB, EMB, make_mesh(mesh_spec), batch_axes=batch_axes)
    table = np.repeat(np.arange(1, VOCAB + 1, dtype=np.float32)[:, None], EMB, axis=1)
    return module, {"params": {"embedding": table}}


@pytest.mark.parametrize("bad_id", [-1, VOCAB])
def test_out_of_range_id_raises_eagerly(bad_id):
    module, params = small_sharded_lookup()
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range: expected 0 <= id < vocab_size={VOCAB}"):
        module.apply(params, np.array([[0, bad_id]]))


@pytest.mark.parametrize("mesh_spec, batch_axes", MESHES)
def test_out_of_range_id_under_jit_gives_zero_row(mesh_spec, batch_axes):
    module, params = small_sharded_lookup(mesh_spec, batch_axes)
    ids = np.array([[5, -1, VOCAB, VOCAB - 1], [-7, 0, 1000, 17]])
    out = np.asarray(jax.jit(module.apply)(params, ids))
    in_range = (ids >= 0) & (ids < VOCAB)
    np.testing.assert_array_equal(out[~in_range], 0.0)
    np.testing.assert_array_equal(out[in_range][:, 0], ids[in_range] + 1)


@pytest.mark.parametrize("vocab_size, axis_name, message", [
    (50, "tensor", "vocab_size=50 is not divisible by the 8 devices of mesh axis 'tensor'"),
    (48, "model", r"unknown mesh axis 'model': the mesh has axes \('data', 'fsdp', 'tensor'\)"),
])
def test_bad_mesh_split_is_rejected(vocab_size, axis_name, message):
    with pytest.raises(ValueError, match=message):
        jr.ParallelVocabEmbedding(vocab_size, EMB, make_mesh("tensor=8"), axis_name=axis_name)


# ----------------------------------------------------------------------------- meshes as users make them

def explicit_mesh(sizes, names):
    """A mesh as plain `jax.make_mesh` builds it: Explicit axes (the default in this JAX)."""
    mesh = jax.make_mesh(sizes, names)
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    return mesh


@pytest.mark.parametrize("in_context", [False, True], ids=["plain", "set_mesh"])
def test_sharded_embedding_on_an_explicit_mesh_equals_single_device(in_context):
    mesh = explicit_mesh((2, 4), ("data", "tensor"))
    module = jr.ParallelVocabEmbedding(VOCAB, EMB, mesh, batch_axes=("data",))
    ids = random_ids((4, 6), seed=2)
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        params = nn.unbox(jax.jit(module.init)(jax.random.key(0), ids))
        out = jax.jit(module.apply)(params, ids)
    table = params["params"]["embedding"]
    assert table.sharding.shard_shape(table.shape) == (VOCAB // 4, EMB)
    single_device = jr.VocabEmbedding(VOCAB, EMB).apply({"params": {"embedding": np.asarray(table)}}, ids)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(single_device))


def test_model_on_an_explicit_mesh_equals_single_device():
    """The model (vocabulary-parallel embedding over tensor=4) on a plain `jax.make_mesh` mesh:
    initialised outside a mesh context, applied outside and inside `jax.set_mesh`. Logits equal the
    mesh-free model's to fp32 rounding (the sharded program sums in another order)."""
    cfg = jr.ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, residual_method="method1")
    mesh = explicit_mesh((2, 1, 4), ("data", "fsdp", "tensor"))
    model = jr.LlamaForCausalLM(cfg, mesh=mesh)
    ids = random_ids((4, 6), seed=3)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    expected = np.asarray(jr.LlamaForCausalLM(cfg).apply(params, ids))
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(np.asarray(apply(params, ids)), expected, rtol=1e-5, atol=1e-6)
    with jax.set_mesh(mesh):
        out = apply(params, jax.device_put(ids, NamedSharding(mesh, P("data"))))
        with pytest.raises(ValueError, match=r"cannot run inside `jax.set_mesh\(mesh\)` of a mesh with Explicit axes"):
            model.init(jax.random.key(0), ids)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------- the model on a mesh

MODEL_MESH = "data=2,fsdp=2,tensor=2"
MODEL_BATCH, MODEL_SEQ, MODEL_LAYERS = 4, 8, 3


def model_inputs(method: str, **overrides):
    """(ModelConfig, unboxed params, ids [4, 8]) of a 3-layer tiny model with random weights."""
    config = tiny_config(layers=MODEL_LAYERS)
    cfg = jax_config(config, method, **overrides)
    params = to_jax_params(random_model(config, method).state_dict(), cfg)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (MODEL_BATCH, MODEL_SEQ))
    return cfg, params, ids


def loss_and_grad(model):
    """value_and_grad of (mean squared logit, logits) w.r.t. the params."""
    def loss(params, ids):
        logits = model.apply({"params": params}, ids)
        return jnp.mean(logits**2), logits

    return jax.value_and_grad(loss, has_aux=True)


def local_shape(shape, sharding_):
    return "f32[" + ",".join(map(str, sharding_.shard_shape(shape))) + "]"


@pytest.mark.optimized
@pytest.mark.parametrize("method, remat", [("method2", "recompute"), ("method5.2", "layer")])
def test_model_on_mesh_has_declared_layouts_and_equals_one_device(method, remat):
    cfg, params, ids = model_inputs(method, remat=remat, attention_state="qk")  # the stored Q/K layout
    (loss_1, logits_1), grads_1 = jax.jit(loss_and_grad(jr.LlamaForCausalLM(cfg)))(params, ids)

    mesh = make_mesh(MODEL_MESH)
    model = jr.LlamaForCausalLM(cfg, mesh)
    param_shardings = sharding.param_shardings(mesh, jax.eval_shape(model.init, jax.random.key(0), ids))["params"]
    step = jax.jit(loss_and_grad(model), in_shardings=(param_shardings, sharding.batch_sharding(mesh)))
    compiled = step.lower(params, ids).compile()

    # logits leave the program split as declared: batch over data*fsdp, vocabulary over tensor
    logits_sharding = compiled.output_shardings[0][1]
    declared = sharding.logical_sharding(mesh, ("batch", "seq", "vocab"))
    assert logits_sharding.is_equivalent_to(declared, 3), logits_sharding
    # the layer scan carries each device's block of the stored Q/K: [L, b/4, s, heads/2, hd]
    carried = [line for line in compiled.as_text().splitlines() if " while(" in line]
    for name, field in stack.carry_fields(cfg.with_attention_state(MODEL_BATCH, MODEL_SEQ)).items():
        shape = field.shape(cfg, MODEL_BATCH, MODEL_SEQ)
        block = local_shape(shape, sharding.logical_sharding(mesh, field.axes))
        assert any(block + "{" in line for line in carried), f"{name}: no layer-scan carry holds {block}"

    (loss_8, logits_8), grads_8 = compiled(jax.device_put(params, param_shardings),
                                           jax.device_put(ids, sharding.batch_sharding(mesh)))
    assert_close(loss_8, loss_1, FP32_RTOL, f"sharded {method} loss")
    assert_close(logits_8, logits_1, FP32_RTOL, f"sharded {method} logits")
    assert_trees_close(grads_8, grads_1, FP32_RTOL, f"sharded {method} grads")


@pytest.mark.optimized
def test_layer_writes_its_carry_in_the_declared_layout():
    """From replicated inputs and a replicated (unconstrained) carry, the carry a layer writes
    is split as its StateField axes declare; without a mesh it stays as the inputs are."""
    cfg, params, ids = model_inputs("method2", attention_state="qk")
    fields = stack.carry_fields(cfg)
    mesh = make_mesh(MODEL_MESH)
    layers = {name: jnp.asarray(value) for name, value in params["layers"].items()}
    x = jnp.asarray(np.random.default_rng(1).normal(size=(MODEL_BATCH, MODEL_SEQ, cfg.hidden_size)), jnp.float32)
    cos, sin = jr.functional.rope_tables(cfg.head_dim, jnp.arange(MODEL_SEQ), cfg.rope_theta, 1.0)
    replicated = NamedSharding(mesh, P())
    inputs = jax.device_put((x, layers, cos, sin), replicated)

    def layer_one(x, layers, cos, sin, mesh):
        state = stack.initial_state(x, cfg, fields)  # no mesh: only the layer places the carry
        p = jax.tree.map(lambda a: a[1], layers)
        return stack.layer_body(cfg, attention_store(cfg, get_method("method2")), fields, mesh)((x, state), 1, p,
                                                                                              layers, cos, sin)[1]

    on_mesh = jax.jit(functools.partial(layer_one, mesh=mesh))(*inputs)
    without = jax.jit(functools.partial(layer_one, mesh=None))(*inputs)
    for name, field in fields.items():
        declared = sharding.logical_sharding(mesh, field.axes)
        assert on_mesh[name].sharding.is_equivalent_to(declared, on_mesh[name].ndim), (name, on_mesh[name].sharding)
        assert without[name].sharding.is_equivalent_to(replicated, without[name].ndim), (name, without[name].sharding)
        assert_close(on_mesh[name], without[name], FP32_RTOL, f"layer 1 {name} on a mesh")


def test_constrain_on_explicit_mesh_reshards():
    """A plain `jax.make_mesh` (Explicit axes) takes `reshard` instead of a sharding hint."""
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES)
    x = jax.device_put(np.arange(64, dtype=np.float32).reshape(4, 2, 8), NamedSharding(mesh, P()))
    out = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "seq", "mlp"), mesh))(x)
    assert out.sharding.spec == P(sharding.BATCH_AXES, None, sharding.TENSOR_AXIS)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))


@pytest.mark.parametrize("logical_axis, ways", [("batch", 4), ("vocab", 2), ("embed", 2), ("seq", 1)])
def test_mesh_ways_follow_the_rules(logical_axis, ways):
    shape = sharding.parse_mesh_shape("data=2,fsdp=2,tensor=2")
    assert sharding.mesh_ways(shape, logical_axis) == ways
    assert sharding.mesh_ways(make_mesh("data=2,fsdp=2,tensor=2"), logical_axis) == ways
