"""LAuReL, the learned augmented residual layer (Menghani et al., ICML 2025, arXiv 2411.07501, Sec. 2;
docs/maths.md C8): every residual connection x_{k+1} = f_k(x_k) + x_k becomes

    x_{k+1} = alpha_k f_k(x_k) + g_k(x_k, x_{k-1}, ..., x_0)

with the variants of Sec. 2.1-2.3, chosen by `laurel_variant` ("+"-joined, combined as Sec. 2.4):

    rw   g = beta_k x_k                          alpha_k, beta_k learnable scalars (both 1 at init)
    lr   g = x_k + B_k A_k x_k                   A_k [r, h], B_k [h, r], rank r = `laurel_rank`
                                                 (B_k = 0 at init, A_k = the first r unit vectors)
    pa   g += sum_{j=1..K} gamma_{k,j} x_{k-j}   the K = `laurel_window` sub-layer inputs before x_k
                                                 (gamma = 0 at init)

    rw+lr: x_{k+1} = alpha_k f_k(x_k) + beta_k (x_k + B_k A_k x_k)

so every variant is the standard residual at its initialisation. Here k counts sub-layers: a
pre-norm Llama layer has two residual connections (attention, then MLP), and LAuReL replaces
each (k = 2l + j); x_0 = the embeddings. Carry (pa only): the K previous sub-layer inputs
[K, b, s, h], shifted at every sub-layer (not written once).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_residual.connections.base import SUBLAYERS, Connection, LayerContext, State, StateField, Weight, at_least, register

VARIANTS = ("rw", "lr", "pa")


@dataclasses.dataclass(frozen=True)
class LaurelKnobs:
    laurel_variant: str = dataclasses.field(
        default="rw+lr", metadata={"help": "laurel: the variants, '+'-joined from rw (residual weights), lr (low-rank), "
                                           "pa (previous activations)"})
    laurel_rank: int = dataclasses.field(default=16, metadata={"help": "laurel: rank r of the lr variant's B A"})
    laurel_window: int = dataclasses.field(
        default=2, metadata={"help": "laurel: how many earlier sub-layer inputs the pa variant adds"})

    def __post_init__(self):
        at_least(1, "laurel_rank", "laurel_window")(self)
        parts = self.laurel_variant.split("+")
        if not parts or any(p not in VARIANTS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"laurel_variant must be '+'-joined distinct parts of {VARIANTS}, got {self.laurel_variant!r}")


def variants(cfg) -> list[str]:
    """The variants of `laurel_variant`, e.g. ["rw", "lr"]."""
    return cfg.knobs.laurel_variant.split("+")


def has(part: str):
    """used(cfg) of a weight of variant `part`."""
    return lambda cfg: part in variants(cfg)


def _per_sublayer(cfg, value, *trailing):
    return np.full((cfg.num_hidden_layers, len(SUBLAYERS), *trailing), value, np.float32)


def _first_unit_vectors(cfg):
    """A^T = the first r columns of the identity [L, 2, h, r] (orthonormal; B = 0 makes lr the identity)."""
    eye = np.eye(cfg.hidden_size, cfg.knobs.laurel_rank, dtype=np.float32)
    return np.broadcast_to(eye, (cfg.num_hidden_layers, len(SUBLAYERS), *eye.shape)).copy()


WEIGHTS = {
    "laurel_scales": Weight(lambda cfg: _per_sublayer(cfg, 1.0, 2), ("sublayers", "mix_terms"), has("rw")),
    "laurel_down": Weight(_first_unit_vectors, ("sublayers", "connection_embed", "low_rank"), has("lr")),
    "laurel_up": Weight(lambda cfg: _per_sublayer(cfg, 0.0, cfg.knobs.laurel_rank, cfg.hidden_size),
                        ("sublayers", "low_rank", "connection_embed"), has("lr")),
    "laurel_gammas": Weight(lambda cfg: _per_sublayer(cfg, 0.0, cfg.knobs.laurel_window),
                            ("sublayers", "earlier_layers"), has("pa")),
}


def augmented_residual(out, x, previous, j: int, p, cfg):
    """x_{k+1} of sub-layer j from its output f(x_k) [b, s, h], its input x_k [b, s, h] and (pa)
    the earlier inputs [K, b, s, h] (x_{k-1} first; zeros before x_0)."""
    used = variants(cfg)
    skip = x
    if "lr" in used:
        down, up = (p[name][j].astype(x.dtype) for name in ("laurel_down", "laurel_up"))
        skip = x + ((x.reshape(-1, x.shape[-1]) @ down) @ up).reshape(x.shape)
    if "rw" in used:
        alpha, beta = p["laurel_scales"][j].astype(x.dtype)
        out, skip = alpha * out, beta * skip
    if "pa" in used:
        skip = skip + jnp.einsum("k,kbsh->bsh", p["laurel_gammas"][j].astype(x.dtype), previous)
    return out + skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Laurel(Connection):
    """Each sub-layer's residual connection augmented (module docstring)."""

    knobs: type = LaurelKnobs

    def state_fields(self, cfg) -> dict[str, StateField]:
        if not has("pa")(cfg):
            return {}
        return {"laurel_previous": StateField(lambda c, b, s: (c.knobs.laurel_window, b, s, c.hidden_size),
                                              ("layers", "batch", "seq", "embed"), written_once=False)}

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        previous = state.get("laurel_previous")
        if previous is not None:  # x_k joins the earlier inputs of the next sub-layer
            state = {**state, "laurel_previous": jnp.concatenate([stream[None], previous[:-1]])}
        j = SUBLAYERS.index(sublayer)
        return stream, lambda out: augmented_residual(out, stream, previous, j, ctx.params, ctx.cfg), state

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Per token, 2L connections x 3 (forward + backward) x 2 FLOPs per multiply-add of: rw
        2h (alpha f, beta g), lr 2hr + h (A x, B (A x), the sum), pa Kh."""
        h, used = cfg.hidden_size, variants(cfg)
        per_connection = (2 * h * ("rw" in used) + (2 * h * cfg.knobs.laurel_rank + h) * ("lr" in used)
                          + cfg.knobs.laurel_window * h * ("pa" in used))
        return {"connections": 6.0 * per_connection * len(SUBLAYERS) * cfg.num_hidden_layers}


register(Laurel(name="laurel", weights=WEIGHTS))
