"""The published cross-layer schemes of docs/maths.md C and D, written literally (the definition the JAX
schemes in jax_residual/connections/ are checked against; the papers and choices are listed there).

Each scheme is a loop over the decoder layers of `ResidualLlamaModel`, whose layers are the
standard pre-norm layers (B0) plus the scheme's learnable parameters, registered on every layer
under the same names as the JAX weights (`model.layers.{l}.<name>`):

    denseformer        a list of block outputs [Z_0 = embeddings, Y_0, Y_1, ...], and after
                       block l: X_{l+1} = sum_j dense_weights[j] Z_j over j = l+1, l+1-k, ... >= 0
                       (every p-th block; the others pass Y_l on)
    value_residual     V_l' = value_lambdas[0] V_l + value_lambdas[1] V_0 for l >= 1
    hyper_connections  a list of n streams; each sub-layer reads sum_k A_m[k] H_k and writes
                       H_i <- B[i] T(.) + sum_k A_r[k, i] H_k (dynamic: + tanh terms per token)
    mhc                the same with sigmoid(A_m), Sinkhorn-Knopp(A_r), 2 sigmoid(B)
    mudd               a list of streams [X_0, X_1, ...]; block l reads its query, key, value
                       inputs and its residual X^Q, X^K, X^V, X^R; after it, per stream and
                       position, X^c = sum_j A[c, j] X_j, A = GELU(rmsnorm(X_{l+1}) W1) W2 + b
    dca                a list of layer outputs [z_0 = embeddings, z_1 = a_0 + m_0, ...]; block l's
                       Q, K, V inputs are sum_j (relu(w_c . rmsnorm(z_j)) + b_{c,j}) * z_j
    laurel             every sub-layer: x <- alpha f(x) + beta (x + x A^T B^T) + sum_j gamma_j x_{-j}
                       (the terms of the variants in laurel_variant)
    attn_res           the input of every sub-layer (and the output) = Σ_i softmax_i(w·RMSNorm(v_i)) v_i
                       over the embeddings and the sub-layer outputs so far (Block: over the sums of
                       the completed blocks and the current block's partial sum)

Scheme knobs are read from the (HF) config with ModelConfig's names and defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

SUBLAYERS = ("attention", "mlp")
KNOB_DEFAULTS = {"dense_dilation": 1, "dense_period": 1, "hc_expansion": 4, "hc_dynamic": False,
                 "sinkhorn_iterations": 20, "mudd_streams": "qkvr", "mudd_static": False, "dca_k": None,
                 "laurel_variant": "rw+lr", "laurel_rank": 16, "laurel_window": 2, "attn_res_blocks": None}


def knob(config, name: str):
    return getattr(config, name, KNOB_DEFAULTS[name])


# ----------------------------------------------------------------------------- DenseFormer


def denseformer(layers, x, rope, config):
    """DenseFormer (arXiv 2402.02622): DWA over the embeddings and every block output so far."""
    k, p = knob(config, "dense_dilation"), knob(config, "dense_period")
    blocks = [x]  # Z_0 = the embeddings
    for l, layer in enumerate(layers):
        blocks.append(layer.block(x, rope))  # Z_{l+1} = Y_l
        if (l + 1) % p == 0:
            x = sum(layer.dense_weights[j] * blocks[j] for j in range(l + 1, -1, -k))
        else:
            x = blocks[-1]
    return x


def denseformer_params(config, l: int) -> dict[str, torch.Tensor]:
    """alpha of the DWA after block l over Z_0..Z_L (entries j <= l+1 used): one-hot at l + 1."""
    alpha = torch.zeros(config.num_hidden_layers + 1)
    alpha[l + 1] = 1.0
    return {"dense_weights": alpha}


# ----------------------------------------------------------------------------- value residual


def value_residual(layers, x, rope, config):
    """ResFormer (arXiv 2410.17897): layers l >= 1 attend with lambda_1 V_l + lambda_2 V_0."""
    first = layers[0]
    v0 = first.self_attn.values(first.input_layernorm(x))  # V_0 [b, s, nkv, hd]
    for l, layer in enumerate(layers):
        lam = layer.value_lambdas
        x = layer.block(x, rope, None if l == 0 else (lambda v, lam=lam: lam[0] * v + lam[1] * v0))
    return x


# ----------------------------------------------------------------------------- hyper-connections


def rms_norm(x, gamma, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


def hc_matrices(layer, j: int, streams, config):
    """(alpha [.., n, n+1] = [A_m | A_r], beta [.., n] = B) of sub-layer j; dynamic HC adds, per
    stream row k and token, s_a tanh(norm(H_k) W_a) and s_b tanh(norm(H_k) w_b)."""
    alpha, beta = layer.hc_alpha[j], layer.hc_beta[j]
    if not hasattr(layer, "hc_dynamic_alpha"):
        return alpha, beta
    normed = [rms_norm(h, layer.hc_norm[j], config.rms_norm_eps) for h in streams]
    s_alpha, s_beta = layer.hc_dynamic_scales[j]
    alpha = alpha + s_alpha * torch.stack([torch.tanh(y @ layer.hc_dynamic_alpha[j]) for y in normed], dim=-2)
    beta = beta + s_beta * torch.stack([torch.tanh(y @ layer.hc_dynamic_beta[j]) for y in normed], dim=-1)
    return alpha, beta


def sinkhorn(logits, iterations: int):
    """Sinkhorn-Knopp: exp(logits), then `iterations` x (rows to sum 1, columns to sum 1)."""
    m = logits.exp()
    for _ in range(iterations):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def mhc_matrices(layer, j: int, streams, config):
    """mHC (arXiv 2512.24880): sigmoid(A_m), Sinkhorn(A_r), 2 sigmoid(B) of HC's dynamic matrices."""
    alpha, beta = hc_matrices(layer, j, streams, config)
    read = torch.sigmoid(alpha[..., :1])
    mix = sinkhorn(alpha[..., 1:], knob(config, "sinkhorn_iterations"))
    return torch.cat([read, mix], dim=-1), 2 * torch.sigmoid(beta)


def hyper_connection(streams, sublayer: Callable, alpha, beta):
    """One sub-layer T between n streams H_k [b, s, h]: h_in = sum_k A_m[k] H_k, then
    H_i <- B[i] T(h_in) + sum_k A_r[k, i] H_k. alpha [.., n, n+1], beta [.., n]."""
    n = len(streams)
    out = sublayer(sum(alpha[..., k, 0, None] * streams[k] for k in range(n)))
    return [beta[..., i, None] * out + sum(alpha[..., k, 1 + i, None] * streams[k] for k in range(n))
            for i in range(n)]


def hc_stack(matrices):
    """The model loop of an HC-style scheme: n copies of the embeddings, every sub-layer of
    every layer through its connection, the output the mean of the streams."""

    def forward(layers, x, rope, config):
        streams = [x] * knob(config, "hc_expansion")
        for layer in layers:
            for j, sublayer in enumerate((lambda y: layer.attention_sublayer(y, rope), layer.mlp_sublayer)):
                streams = hyper_connection(streams, sublayer, *matrices(layer, j, streams, config))
        return sum(streams) / len(streams)

    return forward


def hc_params(dynamic: Callable):
    """Per layer l: [A_m | A_r] [2, n, n+1] (A_m one-hot at sub-layer k = 2l + j mod n, A_r = I),
    B [2, n] ones; with `dynamic(config)`, the norm scale (ones), projections (zeros) and scales
    (0.01)."""

    def params(config, l: int) -> dict[str, torch.Tensor]:
        n, h = knob(config, "hc_expansion"), config.hidden_size
        alpha = torch.zeros(len(SUBLAYERS), n, n + 1)
        for j in range(len(SUBLAYERS)):
            alpha[j, (len(SUBLAYERS) * l + j) % n, 0] = 1.0
            alpha[j, :, 1:] = torch.eye(n)
        out = {"hc_alpha": alpha, "hc_beta": torch.ones(len(SUBLAYERS), n)}
        if dynamic(config):
            out.update(hc_norm=torch.ones(len(SUBLAYERS), h), hc_dynamic_alpha=torch.zeros(len(SUBLAYERS), h, n + 1),
                       hc_dynamic_beta=torch.zeros(len(SUBLAYERS), h),
                       hc_dynamic_scales=torch.full((len(SUBLAYERS), 2), 0.01))
        return out

    return params


# ----------------------------------------------------------------------------- MUDDFormer


def rms_hat(x, eps):
    """rmsnorm without a scale."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def mudd_weights(layer, x, l: int, config):
    """A [C, b, s, l+2] (static: [C, l+2]) after block l from its output x = X_{l+1}: b_l, plus
    GELU(rmsnorm(x) W1[:, :C(l+2)]) W2[:C(l+2)] when dynamic (the DA's C (l+2) hidden units)."""
    width = len(knob(config, "mudd_streams")) * (l + 2)
    bias = layer.mudd_bias[:, :l + 2]
    if knob(config, "mudd_static"):
        return bias
    hidden = F.gelu(rms_hat(x, config.rms_norm_eps) @ layer.mudd_w1[:, :width])  # [b, s, C (l+2)]
    return torch.einsum("bsk,kcj->cbsj", hidden, layer.mudd_w2[:width, :, :l + 2]) + bias[:, None, None, :]


def mudd(layers, x, rope, config):
    """MUDDFormer (arXiv 2502.12170): block l is H = X^R + Attn(N1(X^Q), N1(X^K), N1(X^V)),
    X_{l+1} = H + MLP(N2(H)); then each dense stream c is sum_j A[c, j] X_j (the others X_{l+1})."""
    streams = knob(config, "mudd_streams")
    outputs, inputs = [x], dict.fromkeys("qkvr", x)
    for l, layer in enumerate(layers):
        h = inputs["r"] + layer.multiway_attention_sublayer(inputs["q"], inputs["k"], inputs["v"], rope)
        x = h + layer.mlp_sublayer(h)
        outputs.append(x)
        weights = mudd_weights(layer, x, l, config)
        for c, stream in enumerate(streams):
            inputs[stream] = sum(weights[c][..., j, None] * outputs[j] for j in range(l + 2))
        inputs.update({stream: x for stream in "qkvr" if stream not in streams})
    return inputs["r"]


def mudd_params(config, l: int) -> dict[str, torch.Tensor]:
    """b [C, L+1] one-hot on j = l + 1; dynamic: W1 [h, C (L+1)] ~ N(0, initializer_range), W2 = 0."""
    C, L = len(knob(config, "mudd_streams")), config.num_hidden_layers
    bias = torch.zeros(C, L + 1)
    bias[:, l + 1] = 1.0
    out = {"mudd_bias": bias}
    if not knob(config, "mudd_static"):
        out.update(mudd_w1=torch.randn(config.hidden_size, C * (L + 1)) * config.initializer_range,
                   mudd_w2=torch.zeros(C * (L + 1), C, L + 1))
    return out


# ----------------------------------------------------------------------------- DeepCrossAttention


def grn_entries(l: int, config) -> tuple[list[int], list[int]]:
    """(weighted, summed): the layer outputs j <= l that block l's GRNs weigh, and those k-DCA
    sums with weight 1 (dca_k = k: the first k and last k are weighed)."""
    k = knob(config, "dca_k")
    weighted = [j for j in range(l + 1) if k is None or j < k or j > l - k]
    return weighted, [j for j in range(l + 1) if j not in weighted]


def grn(layer, c: int, outputs, l: int, config):
    """GRN-v3 of stream c: sum_j (relu(w_c . rmsnorm(z_j)) + b_{c,j}) * z_j (+ the summed z_j);
    relu with derivative 1 at 0 (x >= 0)."""
    weighted, summed = grn_entries(l, config)
    total = sum(outputs[j] for j in summed) if summed else 0.0
    for j in weighted:
        gate = rms_hat(outputs[j], config.rms_norm_eps) @ layer.dca_w[c]
        gate = torch.where(gate >= 0, gate, torch.zeros_like(gate))
        total = total + (gate[..., None] + layer.dca_bias[c, j]) * outputs[j]
    return total


def dca(layers, x, rope, config):
    """DeepCrossAttention (arXiv 2502.06785): block l attends with Q, K, V from three GRNs over
    the layer outputs, H = x^Q + a, z_{l+1} = a + MLP(N2(H)); the output is sum_j z_j."""
    outputs = [x]  # z_0 = the embeddings
    for l, layer in enumerate(layers):
        q, k, v = (grn(layer, c, outputs, l, config) for c in range(3))
        a = layer.multiway_attention_sublayer(q, k, v, rope)
        outputs.append(a + layer.mlp_sublayer(q + a))
    return sum(outputs)


def dca_params(config, l: int) -> dict[str, torch.Tensor]:
    """w [3, h] = 0 and b [3, L+1, h] = 1 (entries j <= l used): the standard residual."""
    L, h = config.num_hidden_layers, config.hidden_size
    return {"dca_w": torch.zeros(3, h), "dca_bias": torch.ones(3, L + 1, h)}
# ----------------------------------------------------------------------------- LAuReL


def laurel_parts(config) -> list[str]:
    return knob(config, "laurel_variant").split("+")


def laurel_residual(layer, j: int, out, inputs, config):
    """LAuReL (arXiv 2411.07501, Sec. 2) of sub-layer j: out = f(x_k), inputs = [x_0, ..., x_k]."""
    parts, x = laurel_parts(config), inputs[-1]
    skip = x + x @ layer.laurel_down[j] @ layer.laurel_up[j] if "lr" in parts else x
    if "rw" in parts:
        alpha, beta = layer.laurel_scales[j]
        out, skip = alpha * out, beta * skip
    if "pa" in parts:
        earlier = inputs[-2::-1][:knob(config, "laurel_window")]  # x_{k-1}, x_{k-2}, ...
        skip = skip + sum(layer.laurel_gammas[j][i] * e for i, e in enumerate(earlier))
    return out + skip


def laurel(layers, x, rope, config):
    """Every sub-layer's residual through laurel_residual; inputs: the embeddings and every sub-layer input."""
    inputs = [x]
    for layer in layers:
        for j, sublayer in enumerate((lambda y: layer.attention_sublayer(y, rope), layer.mlp_sublayer)):
            inputs.append(laurel_residual(layer, j, sublayer(inputs[-1]), inputs, config))
    return inputs[-1]


def laurel_params(config, l: int) -> dict[str, torch.Tensor]:
    """(alpha, beta) = 1, A^T = the first r unit vectors, B = 0, gamma = 0: the standard residual."""
    parts, h, r = laurel_parts(config), config.hidden_size, knob(config, "laurel_rank")
    out = {}
    if "rw" in parts:
        out["laurel_scales"] = torch.ones(len(SUBLAYERS), 2)
    if "lr" in parts:
        out["laurel_down"] = torch.eye(h, r).expand(len(SUBLAYERS), h, r).clone()
        out["laurel_up"] = torch.zeros(len(SUBLAYERS), r, h)
    if "pa" in parts:
        out["laurel_gammas"] = torch.zeros(len(SUBLAYERS), knob(config, "laurel_window"))
    return out


# ----------------------------------------------------------------------------- Attention Residuals


def depth_attention(query, values, eps: float):
    """Σ_i softmax_i(queryᵀ RMSNorm(v_i)) v_i over the list of values v_i [b, s, h] (no norm scale)."""
    stacked = torch.stack(values)
    keys = stacked / torch.sqrt(stacked.pow(2).mean(-1, keepdim=True) + eps)
    weights = torch.softmax(keys @ query, dim=0)
    return (weights[..., None] * stacked).sum(0)


def attn_res(layers, x, rope, config):
    """Attention Residuals (arXiv 2603.15031, Sec. 3): blocks of `size` sub-layers (Full: 1); after
    each sub-layer the next input (the last: the output) attends over the completed blocks (b_0 =
    the embeddings) and, inside a block, its partial sum. Layer l holds the queries of the inputs
    after its attention and after its MLP."""
    blocks, partial, h = [x], None, x
    size = 1 if knob(config, "attn_res_blocks") is None else 2 * len(layers) // knob(config, "attn_res_blocks")
    steps = [(sublayer, layer.attn_res_queries[j]) for layer in layers
             for j, sublayer in enumerate((lambda y, layer=layer: layer.attention_sublayer(y, rope), layer.mlp_sublayer))]
    for k, (sublayer, query) in enumerate(steps):
        out = sublayer(h)
        partial = out if k % size == 0 else partial + out
        if k % size == size - 1:
            blocks, partial = blocks + [partial], None
        h = depth_attention(query, blocks + ([] if partial is None else [partial]), config.rms_norm_eps)
    return h


def attn_res_params(config, l: int) -> dict[str, torch.Tensor]:
    """The pseudo-queries of layer l's two following inputs, 0 (uniform weights) as the paper."""
    return {"attn_res_queries": torch.zeros(len(SUBLAYERS), config.hidden_size)}


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Scheme:
    """forward(layers, embeddings, rope, config) -> the last hidden state [b, s, h] (before the
    final norm); params(config, l) -> the learnable parameters of layer l, name -> tensor."""

    forward: Callable
    params: Callable[..., dict[str, torch.Tensor]]


def _value_lambdas(config, l: int) -> dict[str, torch.Tensor]:
    return {"value_lambdas": torch.tensor([0.5, 0.5])}


SCHEMES: dict[str, Scheme] = {
    "denseformer": Scheme(denseformer, denseformer_params),
    "value_residual": Scheme(value_residual, _value_lambdas),
    "hyper_connections": Scheme(hc_stack(hc_matrices), hc_params(lambda config: knob(config, "hc_dynamic"))),
    "mhc": Scheme(hc_stack(mhc_matrices), hc_params(lambda config: True)),
    "mudd": Scheme(mudd, mudd_params),
    "dca": Scheme(dca, dca_params),
    "laurel": Scheme(laurel, laurel_params),
    "attn_res": Scheme(attn_res, attn_res_params),
}
