"""Cross-layer connections: one module per family behind the protocol of base.py, each scheme one
registration. Importing this package registers every built-in scheme, in this order: `standard`,
methods 1-4 (rerun.py), 5.x (scores.py), DenseFormer (dense.py), value residual (values.py),
hyper-connections and mHC (streams.py), MUDDFormer and DeepCrossAttention (multiway.py), LAuReL (laurel.py),
Attention Residuals (attn_res.py).
"""

from jax_residual.connections.base import (SCHEMES, SUBLAYERS, Connection, LayerContext, NoKnobs, StateField, Weight,
                                           get_method, knob_fields, method_names, register, weight_names)

register(Connection(name="standard"))

from jax_residual.connections import rerun, scores  # noqa: E402  (registers methods 1-5)

METHOD_NAMES = method_names()  # the twelve methods of docs/maths.md B, fixed; method_names() is the live registry

from jax_residual.connections import dense, values, streams  # noqa: E402  (registers the published schemes)
from jax_residual.connections import multiway  # noqa: E402  (registers MUDDFormer and DeepCrossAttention)
from jax_residual.connections import laurel  # noqa: E402
from jax_residual.connections import attn_res  # noqa: E402
