"""The published cross-layer schemes of SPEC Part C, as records of the method registry.

* `denseformer` — DenseFormer's depth-weighted average (Pagliardini et al. 2024, arXiv 2402.02622,
  Sec. 3 and the k x p "dilated, periodic" variant of Sec. 3.2): after block l the next input is
  X_{l+1} = sum_j alpha_{l,j} Z_j over Z_0 = the embeddings and Z_{j+1} = Y_j, the output of
  block j (a whole standard layer, both residuals inside). Only j = l + 1 (mod k) is read, and
  only blocks with (l + 1) % p == 0 have a DWA (the others pass Y_l on). alpha starts at the
  identity (alpha_{l,l+1} = 1), so at initialisation the model IS the standard one.
* `value_residual` — ResFormer (Zhou et al. 2024, arXiv 2410.17897, Sec. 3): for l >= 1 the
  attention values are V_l' = lambda_{l,1} V_l + lambda_{l,2} V_0, V_0 = layer 0's values;
  lambda learnable per layer, initialised (0.5, 0.5) as the paper's ResFormer.
* `hyper_connections` — HC (Zhu et al., ICLR 2025, arXiv 2409.19606, Sec. 2 and App. J): the
  residual is n streams H [n, b, s, h]; every sub-layer T (attention, then MLP) reads
  h_in = A_m^T H and writes H <- B^T T(h_in) + A_r^T H. Static HC learns A_m [n], A_r [n, n],
  B [n] per sub-layer; dynamic HC (`hc_dynamic`) adds the input-dependent terms (Sec. 2.2)
      A_m(H) = A_m + s_a tanh(norm(H) W_m),  A_r(H) = A_r + s_a tanh(norm(H) W_r),
      B(H)   = B   + s_b tanh(norm(H) W_b)
  per stream row of H and per token, norm an RMSNorm over h with its own scale (the
  maintained `hyper-connections` package's choice; the paper names a LayerNorm), W initialised
  to 0 and s_a = s_b = 0.01 (the package's values), so dynamic HC equals static HC at init.
* `mhc` — manifold-constrained HC (DeepSeek, arXiv 2512.24880, Sec. 4): HC's dynamic form with
  A_m = sigmoid(.), B = 2 sigmoid(.) (non-negative) and A_r projected onto the doubly
  stochastic matrices by `sinkhorn_iterations` Sinkhorn-Knopp rounds of exp(.).

Choices where the papers leave one open (also in the README):
* HC's Pre-Norm-equivalent initialisation (A_m = one-hot, A_r = I, B = 1) is exact: with the
  embeddings entering every stream, every stream receives every sub-layer output, so all n
  streams stay equal to the standard residual stream X_l, and any one-hot A_m reads it. The
  paper's output sum_k H_k is then n X_L; the model outputs the MEAN of the streams (exactly
  X_L at init, bit for bit; the sum would differ from `standard` through the final RMSNorm's
  eps), which is the sum scaled by 1/n.
* "Layer k" of HC's one-hot A_m = e_{k mod n} counts sub-layers, as the paper does (attention
  and MLP are separate layers there): k = 2 l for the attention and 2 l + 1 for the MLP of
  decoder layer l.
* `mhc` keeps HC's per-stream parametrisation (per-stream RMSNorm, tanh, two scales) and adds
  the paper's constraints; the paper projects the flattened, normalised streams linearly, with
  three scales and biases. Its static part starts at HC's initialisation, which the constraints
  map to a connection that is not the identity (reads sigmoid(1) = 0.73 / sigmoid(0) = 0.5,
  writes 2 sigmoid(1)), so mhc does not equal `standard` at init. Each Sinkhorn round normalises
  the rows, then the columns, of A_r, so that it ends with every new stream a convex combination
  of the old ones (sum_k A_r[k, i] = 1; the paper's H_res = A_r^T row-stochastic).
* Layer 0 of `value_residual` uses its own values (V_0 is what it defines); DenseFormer and HC
  apply at every layer, layer 0 included (their inputs are the embeddings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual import functional as F
from jax_residual.residual import SUBLAYERS, ResidualMethod, Streams, Weight, register

# ----------------------------------------------------------------------------- DenseFormer


def dwa_inputs(l, cfg):
    """Boolean [L+1]: the Z_j the DWA after block l reads (j <= l+1, j = l+1 mod k); after a
    block without a DWA ((l + 1) % p != 0) only Z_{l+1}."""
    j, last = jnp.arange(cfg.num_hidden_layers + 1), l + 1
    has_dwa = last % cfg.dense_period == 0
    return (j <= last) & jnp.where(has_dwa, (last - j) % cfg.dense_dilation == 0, j == last)


def depth_weighted_average(l, p, cfg):
    """alpha [L+1] of X_{l+1} = sum_j alpha_j Z_j: the learned dense_weights on the DWA's inputs,
    or one-hot at l + 1 (Y_l passed on) after a block without a DWA."""
    last = l + 1
    one_hot = (jnp.arange(cfg.num_hidden_layers + 1) == last).astype(jnp.float32)
    alpha = jnp.where(last % cfg.dense_period == 0, p["dense_weights"].astype(jnp.float32), one_hot)
    return jnp.where(dwa_inputs(l, cfg), alpha, 0.0)


def _identity_dwa(cfg):
    """alpha_{l,l+1} = 1, the rest 0: the standard model."""
    L = cfg.num_hidden_layers
    return np.eye(L, L + 1, k=1, dtype=np.float32)


def dwa_term_count(cfg) -> int:
    """How many (block l, Z_j) terms the DWAs of one forward pass sum (blocks without a DWA: 0)."""
    return sum(int(np.sum(np.asarray(dwa_inputs(l, cfg)))) for l in range(cfg.num_hidden_layers)
               if (l + 1) % cfg.dense_period == 0)


def dwa_flops(cfg, seq) -> float:
    """6 h FLOPs per token per DWA term (a multiply-add per element, forward + backward)."""
    return 6.0 * cfg.hidden_size * dwa_term_count(cfg)


# ----------------------------------------------------------------------------- value residual


def value_residual_mix(v, first_values, p):
    """V_l' = lambda_1 V_l + lambda_2 V_0: v, first_values [b, s, nkv, hd]."""
    lam = p["value_lambdas"].astype(v.dtype)
    return lam[0] * v + lam[1] * first_values


def _half_and_half(cfg):
    return np.full((cfg.num_hidden_layers, 2), 0.5, np.float32)


def value_mix_flops(cfg, seq) -> float:
    """Layers 1..L-1 mix two value terms: 2 multiply-adds per kv element, x 3 for the backward."""
    return 6.0 * 2 * cfg.num_key_value_heads * cfg.head_dim * (cfg.num_hidden_layers - 1)


# ----------------------------------------------------------------------------- hyper-connections


def _hc_static_alpha(cfg):
    """[L, 2, n, n+1]: column 0 = A_m = one-hot of the sub-layer index k = 2l + j mod n, columns
    1..n = A_r = I (HC's Pre-Norm-equivalent initialisation)."""
    L, n = cfg.num_hidden_layers, cfg.hc_expansion
    alpha = np.zeros((L, len(SUBLAYERS), n, n + 1), np.float32)
    alpha[..., 1:] = np.eye(n, dtype=np.float32)
    for l in range(L):
        for j in range(len(SUBLAYERS)):
            alpha[l, j, (len(SUBLAYERS) * l + j) % n, 0] = 1.0
    return alpha


def _hc_static_beta(cfg):
    return np.ones((cfg.num_hidden_layers, len(SUBLAYERS), cfg.hc_expansion), np.float32)


def _per_sublayer(value, cfg, *trailing):
    return np.full((cfg.num_hidden_layers, len(SUBLAYERS), *trailing), value, np.float32)


def _dynamic(cfg) -> bool:
    return cfg.hc_dynamic


def _always(cfg) -> bool:
    return True


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
    if not cfg.hc_dynamic:
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
    d_alpha, d_beta = dynamic_terms(stream, j, p, cfg)
    alpha = p["hc_alpha"][j].astype(jnp.float32) + d_alpha
    beta = p["hc_beta"][j].astype(jnp.float32) + d_beta
    read = jax.nn.sigmoid(alpha[..., :1])
    mix = sinkhorn(alpha[..., 1:], cfg.sinkhorn_iterations)
    return jnp.concatenate([read, mix], axis=-1), 2.0 * jax.nn.sigmoid(beta)


def stream_connection(matrices):
    """Streams.connect for HC-style connections with `matrices(H, j, p, cfg) -> (alpha, beta)`."""

    def connect(stream, sublayer: str, p, cfg):
        alpha, beta = matrices(stream, SUBLAYERS.index(sublayer), p, cfg)
        spec = "kt,kbsh->tbsh" if alpha.ndim == 2 else "bskt,kbsh->tbsh"
        mixed = jnp.einsum(spec, alpha.astype(stream.dtype), stream)  # [n+1, b, s, h]
        beta = beta.astype(stream.dtype)
        beta = beta[:, None, None, None] if beta.ndim == 1 else jnp.moveaxis(beta, -1, 0)[..., None]
        return mixed[0], lambda out: mixed[1:] + beta * out

    return connect


def hc_flops(dynamic):
    """extra_flops of an HC-style method: per token, 2L sub-layer connections, forward + backward
    (x 3) of the width mix (n+1) x n x h and the write n x h multiply-adds; when `dynamic(cfg)`
    the projections of the normalised streams, n x h x (n+2) more (norms, tanh, sigmoid and
    Sinkhorn's O(n^2) per token are not counted, as train/flops.py ignores norms and softmax)."""

    def flops(cfg, seq) -> float:
        n, h = cfg.hc_expansion, cfg.hidden_size
        per_connection = (n + 1) * n * h + n * h + (n * h * (n + 2) if dynamic(cfg) else 0)
        return 6.0 * per_connection * len(SUBLAYERS) * cfg.num_hidden_layers

    return flops


def _hc_weights(dynamic) -> dict[str, Weight]:
    """Static [A_m | A_r] and B; with `dynamic`, the norm scale, projections and scales."""
    return {
        "hc_alpha": Weight(_hc_static_alpha, ("sublayers", "streams", "stream_inputs")),
        "hc_beta": Weight(_hc_static_beta, ("sublayers", "streams")),
        "hc_norm": Weight(lambda cfg: _per_sublayer(1.0, cfg, cfg.hidden_size), ("sublayers", "connection_embed"),
                          dynamic),
        "hc_dynamic_alpha": Weight(lambda cfg: _per_sublayer(0.0, cfg, cfg.hidden_size, cfg.hc_expansion + 1),
                                   ("sublayers", "connection_embed", "stream_inputs"), dynamic),
        "hc_dynamic_beta": Weight(lambda cfg: _per_sublayer(0.0, cfg, cfg.hidden_size),
                                  ("sublayers", "connection_embed"), dynamic),
        "hc_dynamic_scales": Weight(lambda cfg: _per_sublayer(0.01, cfg, 2), ("sublayers", "mix_terms"), dynamic),
    }


# ----------------------------------------------------------------------------- the registry

register(ResidualMethod("denseformer", mix_blocks=depth_weighted_average,
                        weights={"dense_weights": Weight(_identity_dwa, ("blocks",))},
                        extra_flops=dwa_flops, knobs=("dense_dilation", "dense_period")))
register(ResidualMethod("value_residual", mix_values=value_residual_mix,
                        weights={"value_lambdas": Weight(_half_and_half, ("mix_terms",))},
                        extra_flops=value_mix_flops))
register(ResidualMethod("hyper_connections",
                        streams=Streams(lambda cfg: cfg.hc_expansion, stream_connection(hc_matrices)),
                        weights=_hc_weights(_dynamic), extra_flops=hc_flops(_dynamic), knobs=("hc_expansion", "hc_dynamic")))
register(ResidualMethod("mhc", streams=Streams(lambda cfg: cfg.hc_expansion, stream_connection(mhc_matrices)),
                        weights=_hc_weights(_always), extra_flops=hc_flops(_always),
                        knobs=("hc_expansion", "sinkhorn_iterations")))
