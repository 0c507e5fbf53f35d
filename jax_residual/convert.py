"""Moving parameters between torch_ref / HF PyTorch state dicts and Flax param trees.

Values may be torch tensors or numpy arrays on the way in; everything goes through numpy
(bfloat16 included, via ml_dtypes). Flax trees may hold `nn.Partitioned` boxes; they are
unboxed on the way out. torch is imported only by the functions that build torch tensors.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from flax import linen as nn

# ----------------------------------------------------------------------------- building blocks


def as_numpy(value) -> np.ndarray:
    """A torch tensor (any device, bf16 included), jax array or array-like -> numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import torch

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def as_torch(value):
    """A numpy/jax array (bf16 included, possibly boxed) -> a CPU torch tensor of the same dtype."""
    import torch

    array = np.array(nn.unbox(value))  # a writable copy
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def group_rms_norm_params_from_torch(state_dict) -> dict:
    """torch GroupRMSNorm {'weight': [h]} -> Flax GroupRMSNorm params {'weight': [h]}."""
    return {"weight": as_numpy(state_dict["weight"])}


def group_rms_norm_params_to_torch(params) -> dict:
    """Flax GroupRMSNorm params -> a state dict for torch GroupRMSNorm.load_state_dict."""
    return {"weight": as_torch(params["weight"])}


def embedding_params_from_torch(state_dict) -> dict:
    """torch VocabEmbedding {'weight': [v, e]} -> Flax VocabEmbedding params {'embedding': [v, e]}."""
    return {"embedding": as_numpy(state_dict["weight"])}


def embedding_params_to_torch(params) -> dict:
    """Flax (Parallel)VocabEmbedding params -> a state dict for torch VocabEmbedding."""
    return {"weight": as_torch(params["embedding"])}


def parallel_embedding_params_from_torch(rank_state_dicts) -> dict:
    """The w torch ParallelVocabEmbedding state dicts (rank order) -> {'embedding': [v, e]}."""
    return {"embedding": np.concatenate([as_numpy(sd["weight"]) for sd in rank_state_dicts])}


def parallel_embedding_params_to_torch(params, world_size: int) -> list[dict]:
    """Flax {'embedding': [v, e]} -> w state dicts, rank r holding rows [r*v/w, (r+1)*v/w)."""
    table = as_torch(params["embedding"])
    if table.shape[0] % world_size:
        raise ValueError(f"vocab_size={table.shape[0]} is not divisible by world_size={world_size}")
    return [{"weight": block.clone()} for block in table.chunk(world_size)]
