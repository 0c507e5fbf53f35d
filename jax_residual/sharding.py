"""The device mesh and every partitioning rule, in one place.

Mesh axes: `data` and `fsdp` split the batch (`fsdp` also splits the parameters' embed
dimension), `tensor` splits heads, MLP and vocabulary (Megatron-style). Parameters and
activations carry logical axis names; `LOGICAL_AXIS_RULES` maps each name to mesh axes. A
logical name absent from the table, or whose mesh axes an earlier dimension of the same array
already uses, is replicated (flax's rule: so activations [batch, seq, embed] keep embed whole
while the batch takes fsdp). The model and the trainer ask this module for axis names and
counts (`TENSOR_AXIS`, `BATCH_AXES`, `mesh_ways`); change a rule here and the program follows.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# logical axis -> mesh axes (None: replicated). Every name used by a parameter or an
# activation is listed, replicated ones included, so this table documents the whole layout.
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", TENSOR_AXIS),
    ("embed", FSDP_AXIS),
    ("heads", TENSOR_AXIS),
    ("kv", TENSOR_AXIS),
    ("mlp", TENSOR_AXIS),
    ("kv_heads", TENSOR_AXIS),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("earlier_layers", None),
    ("exponents", None),
    ("seq", None),
    ("kv_seq", None),
    # the connection weights of the published schemes (docs/maths.md C, connections/): replicated
    ("blocks", None),
    ("mix_terms", None),
    ("sublayers", None),
    ("streams", None),
    ("stream_inputs", None),
    ("connection_embed", None),
    ("low_rank", None),
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
    total = math.prod(shape.values())
    if total != len(devices):
        raise ValueError(f"mesh {shape} needs {total} devices but {len(devices)} are available")
    sizes = tuple(shape[a] for a in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def auto_axes_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis of `Auto` type (a mesh from plain
    `jax.make_mesh` has Explicit axes): GSPMD propagates the shardings through the model."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def explicit_mesh_context() -> bool:
    """Whether a context mesh (`jax.set_mesh`) with Explicit axes is active."""
    return AxisType.Explicit in getattr(jax.sharding.get_abstract_mesh(), "axis_types", ())


def with_auto_axes(fn, *args):
    """fn(*args) with every axis of the context mesh (`jax.set_mesh`) of `Auto` type: inside a
    mesh with Explicit axes the arguments become Auto-typed (`jax.sharding.auto_axes`), so
    GSPMD code runs unchanged, and the result [b, ...] comes back split along its first axis
    as the first argument is. Without such a context: fn(*args)."""
    if not explicit_mesh_context():
        return fn(*args)
    batch_spec = jax.typeof(args[0]).sharding.spec if args[0] is not None else PartitionSpec()
    out_spec = PartitionSpec(batch_spec[0] if batch_spec else None)
    return jax.sharding.auto_axes(fn, out_sharding=out_spec)(*args)


def placement_mesh(mesh: Mesh) -> Mesh:
    """The mesh to place arrays on now: `mesh` itself inside a `jax.set_mesh` context with
    Explicit axes (`place` then reshards), else its Auto-typed twin (sharding constraints
    for GSPMD), whatever the axis types of `mesh` (plain `jax.make_mesh` gives Explicit ones)."""
    return mesh if explicit_mesh_context() else auto_axes_mesh(mesh)


def place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Place x as `sharding` (on a `placement_mesh`) says: `jax.sharding.reshard` inside a
    context mesh with Explicit axes, a sharding constraint otherwise."""
    if explicit_mesh_context():
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def mesh_axes(logical_axis: str) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over (empty: replicated)."""
    target = dict(LOGICAL_AXIS_RULES).get(logical_axis)
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def mesh_ways(mesh: Mesh | Mapping[str, int], logical_axis: str) -> int:
    """Into how many parts `logical_axis` is split on `mesh` (a Mesh, or a shape dict such as
    `parse_mesh_shape` returns): the product of its mesh axes' sizes."""
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(shape.get(axis, 1) for axis in mesh_axes(logical_axis))


def describe_ways(logical_axis: str) -> str:
    """'data*fsdp' for "batch": the mesh axes of a logical axis, for error messages."""
    return "*".join(mesh_axes(logical_axis)) or "(replicated)"


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    """NamedSharding for an array whose dimensions have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES))


def constrain(x, logical_axes: tuple[str | None, ...], mesh: Mesh | None):
    """x constrained to the layout its logical axes map to on `mesh`; x itself when mesh is None.

    A sharding constraint (a hint GSPMD propagates from) on the mesh's Auto-typed twin, or
    `reshard` inside a `jax.set_mesh` context with Explicit axes (see `placement_mesh`).
    """
    if mesh is None:
        return x
    return place(x, logical_sharding(placement_mesh(mesh), logical_axes))


def param_shardings(mesh: Mesh, abstract_variables):
    """Shardings for a (boxed, from `nn.with_logical_partitioning`) variable tree, on the mesh the
    model places its activations on (`placement_mesh`: a plain `jax.make_mesh` mesh works)."""
    logical_specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(logical_specs, placement_mesh(mesh), LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [b, s]: batch over data (and fsdp), sequence replicated (`placement_mesh`)."""
    return logical_sharding(placement_mesh(mesh), ("batch", "seq"))
