"""Hyper-connections (Zhu et al., ICLR 2025, arXiv 2409.19606, Sec. 2 and App. J; docs/maths.md C3)
and manifold-constrained HC (DeepSeek, arXiv 2512.24880, Sec. 4; C4): the residual is n streams
H [n, b, s, h]; every sub-layer T (attention, then MLP) reads h_in = A_m^T H and writes
H <- B^T T(h_in) + A_r^T H. Static HC learns A_m [n], A_r [n, n], B [n] per sub-layer; dynamic HC
(`hc_dynamic`) adds the input-dependent terms (Sec. 2.2), per stream row of H and per token,

    A_m(H) = A_m + s_a tanh(norm(H) W_m),  A_r(H) = A_r + s_a tanh(norm(H) W_r),
    B(H)   = B   + s_b tanh(norm(H) w_b),

norm an RMSNorm over h with its own scale (the maintained `hyper-connections` package's choice;
the paper names a LayerNorm), W initialised to 0 and s_a = s_b = 0.01 (the package's values), so
dynamic HC equals static HC at init. mHC: HC's dynamic form with A_m = sigmoid(.),
B = 2 sigmoid(.) (non-negative) and A_r projected onto the doubly stochastic matrices by
`sinkhorn_iterations` Sinkhorn-Knopp rounds of exp(.).

Choices where the papers leave one open (also in the README):
* The Pre-Norm-equivalent initialisation (A_m = one-hot, A_r = I, B = 1) is exact: with the
  embeddings entering every stream, every stream receives every sub-layer output, so all n
  streams stay equal to the standard residual stream X_l, and any one-hot A_m reads it. The
  paper's output sum_k H_k is then n X_L; the model outputs the MEAN of the streams (exactly X_L
  at init, bit for bit; the sum would differ from `standard` through the final RMSNorm's eps).
* "Layer k" of the one-hot A_m = e_{k mod n} counts sub-layers, as the paper does (attention and
  MLP are separate layers there): k = 2 l for the attention and 2 l + 1 for the MLP of layer l.
* mHC keeps HC's per-stream parametrisation (per-stream RMSNorm, tanh, two scales) and adds the
  paper's constraints; the paper projects the flattened, normalised streams linearly, with
  three scales and biases. Its static part starts at HC's initialisation, which the constraints
  map to a connection that is not the identity (reads sigmoid(1) = 0.73 / sigmoid(0) = 0.5,
  writes 2 sigmoid(1)), so mhc does not equal `standard` at init. Each Sinkhorn round normalises
  the rows, then the columns, of A_r, so that it ends with every new stream a convex combination
  of the old ones (sum_k A_r[k, i] = 1; the paper's H_res = A_r^T row-stochastic).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.connections.base import SUBLAYERS, Connection, LayerContext, State, Weight, at_least, register


def _expansion():
    return dataclasses.field(default=4, metadata={"help": "hyper_connections / mhc: expansion rate n (residual streams)"})


@dataclasses.dataclass(frozen=True)
class HCKnobs:
    hc_expansion: int = _expansion()
    hc_dynamic: bool = dataclasses.field(
        default=False, metadata={"help": "hyper_connections: dynamic (input-dependent) connection weights"})

    __post_init__ = at_least(1, "hc_expansion")


@dataclasses.dataclass(frozen=True)
class MHCKnobs:
    hc_expansion: int = _expansion()
    sinkhorn_iterations: int = dataclasses.field(
        default=20, metadata={"help": "mhc: Sinkhorn-Knopp iterations of the stream-mixing matrix"})

    __post_init__ = at_least(1, "hc_expansion", "sinkhorn_iterations")


def _hc_static_alpha(cfg):
    """[L, 2, n, n+1]: column 0 = A_m = one-hot of the sub-layer index k = 2l + j mod n, columns
    1..n = A_r = I (HC's Pre-Norm-equivalent initialisation)."""
    L, n = cfg.num_hidden_layers, cfg.knobs.hc_expansion
    alpha = np.zeros((L, len(SUBLAYERS), n, n + 1), np.float32)
    alpha[..., 1:] = np.eye(n, dtype=np.float32)
    for l in range(L):
        for j in range(len(SUBLAYERS)):
            alpha[l, j, (len(SUBLAYERS) * l + j) % n, 0] = 1.0
    return alpha


def _per_sublayer(value, cfg, *trailing):
    return np.full((cfg.num_hidden_layers, len(SUBLAYERS), *trailing), value, np.float32)


def is_dynamic(cfg) -> bool:
    """Whether the model has HC's input-dependent terms (always, for mhc)."""
    return getattr(cfg.knobs, "hc_dynamic", True)


def dynamic_terms(stream, j: int, p, cfg):
    """HC's input-dependent terms of sub-layer j: (s_a tanh(norm(H) W_a) [b, s, n, n+1],
    s_b tanh(norm(H) w_b) [b, s, n]) from the streams H [n, b, s, h]."""
    normed = F.group_rms_norm(stream, p["hc_norm"][j], cfg.hidden_size, cfg.rms_norm_eps).astype(jnp.float32)
    alpha = jnp.tanh(jnp.einsum("nbsh,ht->bsnt", normed, p["hc_dynamic_alpha"][j]))
    beta = jnp.tanh(jnp.einsum("nbsh,h->bsn", normed, p["hc_dynamic_beta"][j]))
    scales = p["hc_dynamic_scales"][j]
    return scales[0] * alpha, scales[1] * beta


def hc_matrices(stream, j: int, p, cfg):
    """(alpha [n, n+1] or [b, s, n, n+1] = [A_m | A_r], beta [n] or [b, s, n] = B) of sub-layer j."""
    alpha, beta = p["hc_alpha"][j].astype(jnp.float32), p["hc_beta"][j].astype(jnp.float32)
    if not is_dynamic(cfg):
        return alpha, beta
    d_alpha, d_beta = dynamic_terms(stream, j, p, cfg)
    return alpha + d_alpha, beta + d_beta


def sinkhorn(logits, iterations: int):
    """Sinkhorn-Knopp on exp(logits) [..., n, n]: `iterations` rounds of normalising the rows,
    then the columns, to sum 1 (the max is subtracted first; it cancels)."""
    def normalise(_, m):
        m = m / jnp.sum(m, axis=-1, keepdims=True)
        return m / jnp.sum(m, axis=-2, keepdims=True)

    m = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1), keepdims=True)))
    return jax.lax.fori_loop(0, iterations, normalise, m)  # static trip count: a scan, differentiable


def mhc_matrices(stream, j: int, p, cfg):
    """mHC's constrained [A_m | A_r] and B of sub-layer j: sigmoid(A_m), Sinkhorn(A_r),
    2 sigmoid(B) of HC's dynamic matrices."""
    alpha, beta = hc_matrices(stream, j, p, cfg)
    read = jax.nn.sigmoid(alpha[..., :1])
    mix = sinkhorn(alpha[..., 1:], cfg.knobs.sinkhorn_iterations)
    return jnp.concatenate([read, mix], axis=-1), 2.0 * jax.nn.sigmoid(beta)


def hc_weights() -> dict[str, Weight]:
    """Static [A_m | A_r] and B; for the dynamic form, the norm scale, projections and scales."""
    return {
        "hc_alpha": Weight(_hc_static_alpha, ("sublayers", "streams", "stream_inputs")),
        "hc_beta": Weight(lambda cfg: _per_sublayer(1.0, cfg, cfg.knobs.hc_expansion), ("sublayers", "streams")),
        "hc_norm": Weight(lambda cfg: _per_sublayer(1.0, cfg, cfg.hidden_size), ("sublayers", "connection_embed"),
                          is_dynamic),
        "hc_dynamic_alpha": Weight(lambda cfg: _per_sublayer(0.0, cfg, cfg.hidden_size, cfg.knobs.hc_expansion + 1),
                                   ("sublayers", "connection_embed", "stream_inputs"), is_dynamic),
        "hc_dynamic_beta": Weight(lambda cfg: _per_sublayer(0.0, cfg, cfg.hidden_size),
                                  ("sublayers", "connection_embed"), is_dynamic),
        "hc_dynamic_scales": Weight(lambda cfg: _per_sublayer(0.01, cfg, 2), ("sublayers", "mix_terms"), is_dynamic),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Streams(Connection):
    """An n-wide residual stream; `matrices(H, j, p, cfg) -> (alpha, beta)` of sub-layer j."""

    matrices: Callable
    knobs: type = HCKnobs

    def enter(self, x, cfg, mesh=None):
        """The embeddings as n copies [n, b, s, h]."""
        return sharding.constrain(jnp.broadcast_to(x, (cfg.knobs.hc_expansion, *x.shape)),
                                  ("streams", "batch", "seq", "embed"), mesh)

    def leave(self, stream):
        """The mean of the n streams (see the module docstring)."""
        return stream.mean(axis=0)

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        alpha, beta = self.matrices(stream, SUBLAYERS.index(sublayer), ctx.params, ctx.cfg)
        spec = "kt,kbsh->tbsh" if alpha.ndim == 2 else "bskt,kbsh->tbsh"
        mixed = jnp.einsum(spec, alpha.astype(stream.dtype), stream)  # [n+1, b, s, h]
        beta = beta.astype(stream.dtype)
        beta = beta[:, None, None, None] if beta.ndim == 1 else jnp.moveaxis(beta, -1, 0)[..., None]
        return mixed[0], lambda out: mixed[1:] + beta * out, state

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Per token, 2L sub-layer connections, forward + backward (x 3) of the width mix
        (n+1) x n x h and the write n x h multiply-adds; dynamic: the projections of the
        normalised streams, n x h x (n+2) more (norms, tanh, sigmoid and Sinkhorn's O(n^2) per
        token are not counted, as train/flops.py ignores norms and softmax)."""
        n, h = cfg.knobs.hc_expansion, cfg.hidden_size
        per_connection = (n + 1) * n * h + n * h + (n * h * (n + 2) if is_dynamic(cfg) else 0)
        return {"connections": 6.0 * per_connection * len(SUBLAYERS) * cfg.num_hidden_layers}


register(Streams(name="hyper_connections", matrices=hc_matrices, weights=hc_weights()))
register(Streams(name="mhc", matrices=mhc_matrices, knobs=MHCKnobs, weights=hc_weights()))
