"""The device mesh and every partitioning rule, in one place.

Parameters and activations carry logical axis names; `LOGICAL_AXIS_RULES` maps them to the
mesh axes `data`, `fsdp`, `tensor`. Change a rule here and the whole program follows.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated)
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("earlier_layers", None),
    ("exponents", None),
    ("seq", None),
    # the connection weights of the schemes of SPEC Part C (peers.py): replicated
    ("blocks", None),
    ("mix_terms", None),
    ("sublayers", None),
    ("streams", None),
    ("stream_inputs", None),
    ("connection_embed", None),
)


def parse_mesh_shape(spec: str | None) -> dict[str, int]:
    """'data=4,tensor=2' -> {'data': 4, 'fsdp': 1, 'tensor': 2}. Empty or None: all ones."""
    shape = {axis: 1 for axis in MESH_AXES}
    for item in filter(None, (spec or "").split(",")):
        name, _, size = item.partition("=")
        name = name.strip()
        if name not in shape or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"bad mesh entry {item!r}: expected NAME=SIZE with NAME one of {MESH_AXES} and SIZE >= 1"
            )
        shape[name] = int(size)
    return shape


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) of `Auto` type (GSPMD-style code).

    spec: 'data=4,tensor=2' or a dict; the product of the sizes must equal the device count.
    """
    shape = parse_mesh_shape(spec) if not isinstance(spec, dict) else {**parse_mesh_shape(None), **spec}
    devices = list(jax.devices() if devices is None else devices)
    total = int(np.prod(list(shape.values())))
    if total != len(devices):
        raise ValueError(f"mesh {shape} needs {total} devices but {len(devices)} are available")
    sizes = tuple(shape[a] for a in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_sharding(mesh: Mesh, *logical_axes) -> NamedSharding:
    """NamedSharding for an array whose axes have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES))


def constrain(x, logical_axes: tuple[str, ...]):
    """x constrained to the mesh axes its logical axes map to (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, logical_axes, rules=LOGICAL_AXIS_RULES)


def param_shardings(mesh: Mesh, abstract_variables):
    """Shardings for a (boxed, from `nn.with_logical_partitioning`) variable tree."""
    logical_specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [b, s]: batch over data (and fsdp), sequence replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def check_batch_divides(batch_size: int, mesh: Mesh):
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data*fsdp = {ways} ways")
