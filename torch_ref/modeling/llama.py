"""The residual-method Llama of docs/maths.md B, written literally: the definition others are checked against.

Each layer's attention keeps its probabilities P_l (and raw scores S_l = Q_l K_l^T); a later
layer l re-runs the earlier layers i < l on its own input X_l with their stored P_i:

    A~_i(X) = heads(P_i . (N1_i(X) Wv_i)) Wo_i            (attention recomputed, Q and K not)
    M~_i(X) = MLP_i(N2_i(X + A~_i(X)))                    (MLP recomputed on top of it)

The twelve methods differ only in the few lines of the RULES table below. Layer 0 is always
the standard layer. No performance tricks: the loops over earlier layers are the point. The
published schemes of docs/maths.md C and D (DenseFormer, value residual, hyper-connections, mHC,
MUDDFormer, DCA) are loops over these same layers, in peers.py.

Shapes: b batch, s sequence, h hidden, v vocab, nh query heads, nkv kv heads, hd head dim,
L layers. Everything is float32; softmax is float32; the causal mask is boolean (masked
scores become the most negative float32 before the softmax, never touching probabilities).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.functional import check_token_ids
from torch_ref.modeling.peers import SCHEMES
from torch_ref.modeling.norm import GroupRMSNorm
from torch_ref.modeling.pos_emb import NTKAwareRoPE
from torch_ref.modeling.vocab_emb import VocabEmbedding

# ----------------------------------------------------------------------------- the methods


def _sum(layer, rerun) -> torch.Tensor:
    """w_{l,i} = 1 for the re-run layers i < l (methods 1, 2)."""
    return torch.ones(len(rerun))


def _mean(layer, rerun) -> torch.Tensor:
    """w_{l,i} = 1/l for i < l (1 / #re-run layers) (methods 3.1, 4.1)."""
    return torch.full((len(rerun),), 1.0 / len(rerun))


def _softmax(layer, rerun) -> torch.Tensor:
    """w_{l,.} = softmax(alpha_{l,i} for the re-run i < l), alpha learnable, init 0 (methods 3.2, 4.2)."""
    return torch.softmax(layer.residual_weight_logits[rerun], dim=0)


def _scores_over(d_s: Callable) -> Callable:
    """Method 5.1-5.4: logits = (sum_{i<=l} S_i) / d_s(hd, m, layer), m = l + 1."""
    return lambda layer, scores, hd: sum(scores) / d_s(hd, len(scores), layer)


def _standard_scores(layer, scores, hd):
    """logits = S_l / sqrt(hd): ordinary attention (S_l is the last of `scores`)."""
    return scores[-1] / math.sqrt(hd)


def _weighted_scores(layer, scores, hd):
    """Method 5.5: logits = sum_{i<=l} c_{l,i} S_i / sqrt(hd), c learnable, init 1/sqrt(m)."""
    return sum(c * s for c, s in zip(layer.score_weights, scores)) / math.sqrt(hd)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where a method departs from the standard layer at a layer l >= 1 (docs/maths.md B2).

    attn_weights(layer, rerun) -> w: H_l = a_l + sum_{i in rerun} w_i A~_i(X_l)   (None: H_l = X_l + a_l)
    mlp_weights(layer, rerun) -> w:  X_{l+1} = m_l + sum_{i in rerun} w_i M~_i(X_l) (None: X_{l+1} = H_l + m_l)
    (keep_identity, the rerun_keep_identity knob: H_l = X_l + a_l + sum ..., X_{l+1} = H_l + m_l + sum ...)
    rerun: the earlier layers i < l that layer l re-runs (all, unless the cost knobs narrow it;
    none: the standard residual).
    score_logits(layer, [S_0..S_l], hd) -> pre-mask attention logits of layer l.
    param: the learnable per-layer parameter the rule reads (created by the layer).
    """

    attn_weights: Callable | None = None
    mlp_weights: Callable | None = None
    score_logits: Callable = _standard_scores
    param: str | None = None


RULES: dict[str, Rule] = {
    "standard": Rule(),
    "method1": Rule(mlp_weights=_sum),
    "method2": Rule(attn_weights=_sum),
    "method3.1": Rule(mlp_weights=_mean),
    "method3.2": Rule(mlp_weights=_softmax, param="residual_weight_logits"),
    "method4.1": Rule(attn_weights=_mean),
    "method4.2": Rule(attn_weights=_softmax, param="residual_weight_logits"),
    "method5.1": Rule(score_logits=_scores_over(lambda hd, m, layer: math.sqrt(hd))),
    "method5.2": Rule(score_logits=_scores_over(lambda hd, m, layer: math.sqrt(hd) * math.sqrt(m))),
    "method5.3": Rule(score_logits=_scores_over(lambda hd, m, layer: math.sqrt(hd) * m)),
    "method5.4": Rule(
        score_logits=_scores_over(lambda hd, m, layer: hd ** layer.score_exponents[0] * m ** layer.score_exponents[1]),
        param="score_exponents",
    ),
    "method5.5": Rule(score_logits=_weighted_scores, param="score_weights"),
}

# Initial value of each learnable method parameter of layer l in an L-layer model.
PARAM_INITS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "residual_weight_logits": lambda num_layers, l: torch.zeros(num_layers),  # [L], entries i < l used
    "score_exponents": lambda num_layers, l: torch.tensor([0.5, 0.5]),  # (a, b)
    "score_weights": lambda num_layers, l: torch.full((num_layers,), (l + 1) ** -0.5),  # [L], i <= l used
}


def check_method(name: str) -> Rule:
    """The rule of a method of docs/maths.md B; a scheme of C (SCHEMES) uses the standard layer."""
    if name not in RULES and name not in SCHEMES:
        raise ValueError(f"unknown residual method {name!r}; expected one of {[*RULES, *SCHEMES]}")
    return RULES.get(name, RULES["standard"])


def method_params(config, method: str, l: int) -> dict[str, torch.Tensor]:
    """The learnable method parameters of layer l, name -> initial value."""
    if method in SCHEMES:
        return SCHEMES[method].params(config, l)
    param = RULES[method].param
    return {} if param is None else {param: PARAM_INITS[param](config.num_hidden_layers, l)}


# ----------------------------------------------------------------------------- the blocks


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Boolean [s, s] on `device`: query t may attend key u iff u <= t."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


class LlamaAttention(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.nh * head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * head_dim, bias=False)
        self.o_proj = nn.Linear(self.nh * head_dim, h, bias=False)

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """[b, s, n*hd] -> [b, s, n, hd]."""
        return x.view(*x.shape[:2], num_heads, self.hd)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, nkv, hd] -> [b, nh, s, hd]; query head j reads kv head j // (nh / nkv) (HF order)."""
        return x.transpose(1, 2).repeat_interleave(self.nh // self.nkv, dim=1)

    def _attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """o_proj(heads(P V)): probs [b, nh, s, s], v [b, s, nkv, hd] -> [b, s, h]."""
        out = probs @ self._repeat_kv(v)  # [b, nh, s, hd]
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def values(self, y) -> torch.Tensor:
        """V = y Wv as [b, s, nkv, hd]."""
        return self._heads(self.v_proj(y), self.nkv)

    def forward(self, y, rope, score_logits, mix_values=None, key_value_inputs=None):
        """y = N1(X) [b, s, h]. Returns (output [b, s, h], P [b, nh, s, s], S [b, nh, s, s]).

        S = Q K^T (post-RoPE, unscaled); score_logits(S) -> the pre-mask logits (the method's rule);
        mix_values(V) -> the values attended (value residual; default V); key_value_inputs: the
        (normed) inputs of K and V where they are not y (MUDDFormer, DCA).
        """
        y_k, y_v = (y, y) if key_value_inputs is None else key_value_inputs
        q = rope(self._heads(self.q_proj(y), self.nh)).transpose(1, 2)  # [b, nh, s, hd]
        k = self._repeat_kv(rope(self._heads(self.k_proj(y_k), self.nkv)))  # [b, nh, s, hd]
        scores = q @ k.transpose(-1, -2)  # S [b, nh, s, s]
        logits = score_logits(scores).float()
        logits = logits.masked_fill(~causal_mask(y.shape[1], logits.device), torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        v = self.values(y_v)
        return self._attend(probs, v if mix_values is None else mix_values(v)), probs, scores

    def forward_with_precomputed_weights(self, y, probs):
        """The note's recompute path: stored P (causal), values from the new y = N1(X)."""
        return self._attend(probs, self.values(y))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rms_norm(config):
    """Llama RMSNorm = GroupRMSNorm with one group, gamma initialised to ones."""
    return GroupRMSNorm(config.hidden_size, config.hidden_size, eps=config.rms_norm_eps, init_range=(1.0, 1.0))


class ResidualDecoderLayer(nn.Module):
    def __init__(self, config, idx: int, method: str, head_dim: int):
        super().__init__()
        self.idx = idx
        self.rule = check_method(method) if idx > 0 else RULES["standard"]  # layer 0 is always standard
        self.self_attn = LlamaAttention(config, head_dim)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = _rms_norm(config)
        self.post_attention_layernorm = _rms_norm(config)
        # every layer owns them (uniform state dict); layer 0 of methods 3-5 never reads them
        for name, value in method_params(config, method, idx).items():
            self.register_parameter(name, nn.Parameter(value))

    def attention_sublayer(self, x, rope, mix_values=None):
        """a = Attn(N1(x)) with standard scores [b, s, h]."""
        hd = self.self_attn.hd
        return self.self_attn(self.input_layernorm(x), rope, lambda s: s / math.sqrt(hd), mix_values)[0]

    def multiway_attention_sublayer(self, q_input, k_input, v_input, rope):
        """a = Attn with Q from N1(q_input), K from N1(k_input), V from N1(v_input) [b, s, h]."""
        norm, hd = self.input_layernorm, self.self_attn.hd
        return self.self_attn(norm(q_input), rope, lambda s: s / math.sqrt(hd),
                              key_value_inputs=(norm(k_input), norm(v_input)))[0]

    def mlp_sublayer(self, h):
        """m = MLP(N2(h)) [b, s, h]."""
        return self.mlp(self.post_attention_layernorm(h))

    def block(self, x, rope, mix_values=None):
        """The standard pre-norm layer (B0): H = x + Attn(N1(x)), out = H + MLP(N2(H))."""
        h = x + self.attention_sublayer(x, rope, mix_values)
        return h + self.mlp_sublayer(h)

    def recompute_attention(self, x, probs):
        """A~_i(X) with this layer's weights and stored P_i."""
        return self.self_attn.forward_with_precomputed_weights(self.input_layernorm(x), probs)

    def recompute_mlp(self, x, probs):
        """M~_i(X) = MLP_i(N2_i(X + A~_i(X)))."""
        return self.mlp(self.post_attention_layernorm(x + self.recompute_attention(x, probs)))

    def forward(self, x, rope, rerun, earlier_layers, earlier_probs, earlier_scores, keep_identity=False):
        """x = X_l [b, s, h]; earlier_* hold layers i < l and their stored P_i, S_i; rerun: the
        indices i of the earlier layers to re-run; keep_identity: the re-run sum is added to the
        identity path (X_l, or H_l for the MLP step) instead of replacing it.

        Returns (X_{l+1}, P_l, S_l).
        """
        rule, hd = self.rule, self.self_attn.hd
        a, probs, scores = self.self_attn(
            self.input_layernorm(x), rope, lambda s: rule.score_logits(self, [*earlier_scores, s], hd)
        )
        if rule.attn_weights is None or not rerun:
            h = x + a
        else:
            recomputed = [earlier_layers[i].recompute_attention(x, earlier_probs[i]) for i in rerun]
            h = a + sum(w * r for w, r in zip(rule.attn_weights(self, rerun), recomputed))
            if keep_identity:
                h = x + h

        m = self.mlp(self.post_attention_layernorm(h))
        if rule.mlp_weights is None or not rerun:
            out = h + m
        else:
            recomputed = [earlier_layers[i].recompute_mlp(x, earlier_probs[i]) for i in rerun]
            out = m + sum(w * r for w, r in zip(rule.mlp_weights(self, rerun), recomputed))
            if keep_identity:
                out = h + out
        return out, probs, scores


# ----------------------------------------------------------------------------- the model


def _rope_theta(config) -> float:
    """rope_theta is a config attribute in older transformers, in rope_parameters in 5.x."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported, got rope_parameters={params}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return 10000.0 if theta is None else float(theta)


def rerun_layers(l: int, window: int | None = None, every: int = 1) -> list[int]:
    """The earlier layers i < l that layer l re-runs: all by default; `window` keeps the last
    `window` of them, `every` keeps i = 0, p, 2p, ... (the cost knobs of methods 1-4)."""
    return [i for i in range(l) if i % every == 0 and (window is None or i >= l - window)]


class ResidualLlamaModel(nn.Module):
    def __init__(self, config, residual_method: str, rerun_window: int | None = None, rerun_every: int = 1,
                 rerun_keep_identity: bool = False):
        super().__init__()
        check_method(residual_method)
        self.rerun_window, self.rerun_every, self.rerun_keep_identity = rerun_window, rerun_every, rerun_keep_identity
        self.config, self.scheme = config, SCHEMES.get(residual_method)
        head_dim = config.hidden_size // config.num_attention_heads
        if getattr(config, "head_dim", None) not in (None, head_dim):
            raise ValueError(f"head_dim {config.head_dim} != hidden_size / num_attention_heads is not supported")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("biased linears are not part of this model")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
        self.vocab_size, self.max_positions = config.vocab_size, config.max_position_embeddings
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, init_std=config.initializer_range)
        self.layers = nn.ModuleList(
            ResidualDecoderLayer(config, l, residual_method, head_dim) for l in range(config.num_hidden_layers)
        )
        self.norm = _rms_norm(config)
        self.rotary_emb = NTKAwareRoPE(head_dim, config.max_position_embeddings, base=_rope_theta(config), ratio=1)

    def forward(self, input_ids=None, inputs_embeds=None):
        """input_ids [b, s] int, or inputs_embeds [b, s, h]. Returns the final-normed hidden [b, s, h]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.shape[1] > self.max_positions:
            raise ValueError(
                f"sequence length {inputs_embeds.shape[1]} exceeds max_position_embeddings={self.max_positions}"
            )
        if self.scheme is not None:
            return self.norm(self.scheme.forward(self.layers, inputs_embeds, self.rotary_emb, self.config))
        x, probs, scores = inputs_embeds, [], []
        for l, layer in enumerate(self.layers):
            rerun = rerun_layers(l, self.rerun_window, self.rerun_every)
            x, p, s = layer(x, self.rotary_emb, rerun, self.layers[:l], probs, scores, self.rerun_keep_identity)
            probs.append(p)
            scores.append(s)
        return self.norm(x)


class ResidualLlamaForCausalLM(nn.Module):
    """HF-compatible state-dict keys; `load_state_dict(hf_model.state_dict(), strict=False)` works."""

    def __init__(self, config, residual_method: str = "standard", rerun_window: int | None = None, rerun_every: int = 1,
                 rerun_keep_identity: bool = False):
        super().__init__()
        self.config, self.residual_method = config, residual_method
        self.model = ResidualLlamaModel(config, residual_method, rerun_window, rerun_every, rerun_keep_identity)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, inputs_embeds=None):
        """Returns logits [b, s, v] (float32)."""
        return self.lm_head(self.model(input_ids, inputs_embeds=inputs_embeds))
