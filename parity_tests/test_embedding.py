"""VocabEmbedding (docs/maths.md A2) and the single-rank ParallelVocabEmbedding (docs/maths.md A3): torch
reference vs JAX, independent references, init, errors, inputs left untouched.
(The sharded JAX ParallelVocabEmbedding is tested in test_sharding.py.)

Tolerances: a lookup is a copy, so forward outputs must be bitwise equal. Table gradients are
scatter-adds of cotangent rows whose summation order may differ: float32 rtol = atol = 1e-5;
bfloat16 sums round to 8 mantissa bits at each step -> rtol = atol = 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

import jax_residual as jr
import torch_ref as tr
from jax_residual.convert import (as_numpy, embedding_params_from_torch, embedding_params_to_torch,
                                  parallel_embedding_params_from_torch)

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def random_ids(shape, vocab_size, seed):
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape, dtype=np.int64)


def embedding_pair(vocab_size, emb_size, dtype, world_size=None, rank=None):
    """(torch module, jax fn(table, ids)) computing the same embedding.

    world_size None: VocabEmbedding; else rank `rank` of a ParallelVocabEmbedding.
    """
    if world_size is None:
        module = jr.VocabEmbedding(vocab_size, emb_size, param_dtype=DTYPES[dtype][1])
        return (tr.VocabEmbedding(vocab_size, emb_size, init_seed=5, dtype=DTYPES[dtype][0]),
                lambda table, ids: module.apply({"params": {"embedding": table}}, ids))
    return (tr.ParallelVocabEmbedding(vocab_size, emb_size, rank, world_size, dtype=DTYPES[dtype][0]),
            lambda table, ids: jr.parallel_embedding_shard(table, ids, rank))


def torch_forward_and_grad(module, ids, cotangent):
    out = module(torch.from_numpy(ids))
    (out.float() * torch.from_numpy(cotangent)).sum().backward()
    return out, module.weight.grad


def jax_forward_and_grad(fn, table, ids, cotangent):
    def projection(table):
        out = fn(table, ids)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grad = jax.jit(jax.value_and_grad(projection, has_aux=True))(table)
    return out, grad


@pytest.mark.parametrize("vocab_size, emb_size, ids_shape, dtype, world_size, rank", [
    (50, 8, (2, 7), "float32", None, None),
    (7, 3, (1, 20), "float32", None, None),  # many repeated ids: gradient rows accumulate
    (1000, 16, (3, 5), "bfloat16", None, None),
    (12, 4, (2, 9), "float32", 1, 0),
    (12, 4, (3, 8), "float32", 4, 0),
    (12, 4, (3, 8), "float32", 4, 3),
    (40, 6, (2, 10), "bfloat16", 5, 2),
])
def test_torch_jax_forward_and_gradient(vocab_size, emb_size, ids_shape, dtype, world_size, rank):
    torch_module, jax_fn = embedding_pair(vocab_size, emb_size, dtype, world_size, rank)
    table = jnp.asarray(as_numpy(torch_module.weight))
    ids = random_ids(ids_shape, vocab_size, seed=0)
    cotangent = np.random.default_rng(1).normal(size=ids_shape + (emb_size,)).astype(np.float32)

    torch_out, torch_grad = torch_forward_and_grad(torch_module, ids, cotangent)
    jax_out, jax_grad = jax_forward_and_grad(jax_fn, table, ids, cotangent)

    assert jax_out.dtype == DTYPES[dtype][1] and torch_out.dtype == DTYPES[dtype][0]
    np.testing.assert_array_equal(as_numpy(jax_out), as_numpy(torch_out))
    np.testing.assert_allclose(as_numpy(jax_grad).astype(np.float32), as_numpy(torch_grad).astype(np.float32),
                               **TOL[dtype])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_vocab_embedding_equals_torch_functional_embedding(framework):
    torch_module = tr.VocabEmbedding(30, 5)
    ids = random_ids((4, 6), 30, seed=2)
    expected = torch.nn.functional.embedding(torch.from_numpy(ids), torch_module.weight).detach().numpy()
    if framework == "torch":
        out = torch_module(torch.from_numpy(ids)).detach().numpy()
    else:
        out = jr.VocabEmbedding(30, 5).apply({"params": embedding_params_from_torch(torch_module.state_dict())}, ids)
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("world_size", [1, 3, 6])
def test_torch_parallel_ranks_sum_to_concatenated_vocab_embedding(world_size):
    ranks = [tr.ParallelVocabEmbedding(18, 4, rank, world_size) for rank in range(world_size)]
    full = tr.VocabEmbedding(18, 4)
    full.load_state_dict(embedding_params_to_torch(
        parallel_embedding_params_from_torch([module.state_dict() for module in ranks])))
    ids = torch.from_numpy(random_ids((3, 7), 18, seed=3))
    torch.testing.assert_close(sum(module(ids) for module in ranks), full(ids), rtol=0, atol=0)


def test_params_round_trip_torch_to_flax_and_back():
    for dtype in (torch.float32, torch.bfloat16):
        state = tr.VocabEmbedding(9, 3, dtype=dtype).state_dict()
        back = embedding_params_to_torch(embedding_params_from_torch(state))
        assert back["weight"].dtype == dtype and torch.equal(back["weight"], state["weight"])


VOCAB, EMB, MEAN, STD = 256, 64, 0.5, 2.0


def torch_table(seed):
    return tr.VocabEmbedding(VOCAB, EMB, init_mean=MEAN, init_std=STD, init_seed=seed).weight.detach().numpy()


def jax_table(seed, rng_seed=0):
    module = jr.VocabEmbedding(VOCAB, EMB, init_mean=MEAN, init_std=STD, init_seed=seed)
    variables = module.init(jax.random.key(rng_seed), jnp.zeros((1, 1), jnp.int32))
    return np.asarray(nn.unbox(variables)["params"]["embedding"])


def torch_rank_table(rank):
    return tr.ParallelVocabEmbedding(4 * VOCAB, EMB, rank, 4, init_mean=MEAN, init_std=STD,
                                     init_base_seed=10).weight.detach().numpy()


@pytest.mark.parametrize("draw", [torch_table, jax_table, torch_rank_table])
def test_init_is_seeded_normal(draw):
    table = draw(1)
    assert table.shape == (VOCAB, EMB)
    np.testing.assert_array_equal(draw(1), table)
    assert not np.allclose(draw(2), table)
    # Normal(MEAN, STD) from n samples: mean within 5 standard errors (STD/sqrt(n)), sample
    # std within 5 of its standard errors (STD/sqrt(2n)).
    n = table.size
    assert abs(table.mean() - MEAN) < 5 * STD / np.sqrt(n)
    assert abs(table.std() - STD) < 5 * STD / np.sqrt(2 * n)


def test_torch_rank_table_is_vocab_table_seeded_base_plus_rank():
    for rank in range(4):
        np.testing.assert_array_equal(torch_rank_table(rank), torch_table(10 + rank))


def test_jax_init_seed_ignores_rng_and_none_uses_it():
    np.testing.assert_array_equal(jax_table(5, rng_seed=0), jax_table(5, rng_seed=1))
    np.testing.assert_array_equal(jax_table(None, rng_seed=3), jax_table(None, rng_seed=3))
    assert not np.allclose(jax_table(None, rng_seed=0), jax_table(None, rng_seed=1))


SMALL_TABLE = np.arange(30, dtype=np.float32).reshape(10, 3)


def jax_small_lookup(ids):
    return jr.VocabEmbedding(10, 3).apply({"params": {"embedding": SMALL_TABLE}}, ids)


LOOKUPS = {  # name -> fn(numpy ids [b, s]) over a vocabulary of 10
    "torch VocabEmbedding": lambda ids: tr.VocabEmbedding(10, 3)(torch.from_numpy(ids)),
    "torch ParallelVocabEmbedding": lambda ids: tr.ParallelVocabEmbedding(10, 3, 1, 2)(torch.from_numpy(ids)),
    "jax VocabEmbedding": jax_small_lookup,
}


@pytest.mark.parametrize("bad_id", [-1, 10, 12345])
@pytest.mark.parametrize("name", LOOKUPS)
def test_out_of_range_id_raises(name, bad_id):
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range: expected 0 <= id < vocab_size=10"):
        LOOKUPS[name](np.array([[1, bad_id, 2]]))


def test_jax_out_of_range_id_under_jit_gives_zero_row():
    out = np.asarray(jax.jit(jax_small_lookup)(np.array([[1, -1, 10, 9]])))
    np.testing.assert_array_equal(out[0, [1, 2]], 0.0)
    np.testing.assert_array_equal(out[0, [0, 3]], SMALL_TABLE[[1, 9]])


@pytest.mark.parametrize("vocab_size, rank, world_size, message", [
    (10, 0, 3, "vocab_size=10 is not divisible by world_size=3"),
    (12, 3, 3, r"rank=3 is outside \[0, world_size=3\)"),
    (12, -1, 3, r"rank=-1 is outside \[0, world_size=3\)"),
])
def test_torch_parallel_rejects_bad_split(vocab_size, rank, world_size, message):
    with pytest.raises(ValueError, match=message):
        tr.ParallelVocabEmbedding(vocab_size, 4, rank, world_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda dtype: tr.VocabEmbedding(16, 4, dtype=dtype),
                                  lambda dtype: tr.ParallelVocabEmbedding(16, 4, 1, 4, dtype=dtype)],
                         ids=["VocabEmbedding", "ParallelVocabEmbedding"])
def test_torch_ids_untouched_output_on_ids_device_in_table_dtype(make, dtype):
    ids = torch.from_numpy(random_ids((2, 5), 16, seed=4))
    before = ids.clone()
    out = make(dtype)(ids)
    assert torch.equal(ids, before) and ids.dtype == torch.int64 and ids.device == before.device
    assert out.device == ids.device and out.dtype == dtype and out.shape == (2, 5, 4)


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
def test_jax_ids_untouched_output_in_param_dtype(ids_dtype):
    ids = random_ids((2, 5), 16, seed=5).astype(ids_dtype)
    before = ids.copy()
    module = jr.VocabEmbedding(16, 4, param_dtype=jnp.bfloat16)
    out = module.apply(module.init(jax.random.key(0), ids), ids)
    np.testing.assert_array_equal(ids, before)
    assert ids.dtype == ids_dtype and out.dtype == jnp.bfloat16 and out.shape == (2, 5, 4)
