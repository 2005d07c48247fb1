"""Logical axis names -> mesh axes: the one rule table, the mesh, and placement helpers.

Every parameter carries logical axis names (see `model.py`); activations are constrained with
`constrain`. `LOGICAL_RULES` maps both onto the three mesh axes:

- `data`:   pure data parallelism (batch only; params replicated across it),
- `fsdp`:   batch *and* parameter sharding along the embedding dimension (ZeRO-3 style),
- `tensor`: Megatron tensor parallelism over heads, MLP hidden units and the vocabulary.

Jitted steps take `NamedSharding`s built here as their in/out shardings.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("position", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_head_dim", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; -1 means "all remaining devices"."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def logical_to_spec(axes: Sequence[str | None]) -> P:
    """PartitionSpec for one array given its logical axis names."""
    return nn.logical_to_mesh_axes(tuple(axes), LOGICAL_RULES)


def fitted_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape) -> P:
    """`logical_to_spec(axes)` with every dimension that its mesh axes do not divide left
    unsharded (e.g. GPT-2's vocabulary of 50257 over `tensor`, or a batch of 1)."""
    return divisible(logical_to_spec(axes), shape, mesh_shape)


def divisible(spec: P, shape: Sequence[int], mesh_shape) -> P:
    """`spec` with every dimension that its mesh axes do not divide left unsharded."""
    dims = []
    for size, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = (names,) if isinstance(names, str) else (names or ())
        dims.append(names if size % math.prod(mesh_shape[a] for a in group) == 0 else None)
    return P(*dims)


def logical_shardings(logical_specs, mesh: Mesh, shapes=None):
    """Map a pytree of logical PartitionSpecs to NamedShardings on `mesh`; with `shapes` (a
    matching pytree of arrays or ShapeDtypeStructs), as fitted by `fitted_spec`."""
    is_spec = lambda x: isinstance(x, P)
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(s)), logical_specs,
                            is_leaf=is_spec)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fitted_spec(s, x.shape, mesh.shape)),
                        logical_specs, shapes, is_leaf=is_spec)


def moved_to(tree, mesh: Mesh):
    """`tree`'s arrays placed on `mesh` (another set of devices, the same axis names), each
    laid out by the partition spec it has now, less the mesh axes that do not divide its
    dimensions there: a device-to-device copy (`rl.rollout_devices`), asynchronous."""
    def place(x):
        spec = getattr(x.sharding, "spec", P())     # one device's array: replicated there
        return jax.device_put(x, NamedSharding(mesh, divisible(spec, x.shape, mesh.shape)))
    return jax.tree.map(place, tree)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names (dimensions the mesh does not divide stay
    unsharded); a no-op outside `jax.set_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(axes, x.shape, mesh.shape))


def fsdp_gathered_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape) -> P:
    """A param's `fitted_spec` without `fsdp`: the layout of its copy all-gathered over `fsdp`
    (still split over `tensor`). Param axes map to one mesh axis each."""
    return P(*(None if names == "fsdp" else names
               for names in fitted_spec(axes, shape, mesh_shape)))


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: dim `axis` (the leading one) over (data, fsdp), the rest
    replicated."""
    return NamedSharding(mesh, logical_to_spec(
        (None,) * axis + ("act_batch",) + (None,) * (ndim - 1 - axis)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Place this process's rows of a batch (a pytree of numpy arrays, batch first) onto the
    mesh as global arrays, batch-sharded; scalars are replicated.

    In a single process that is the whole batch. With several, each process passes only the
    rows its devices hold, in order (`distributed.process_rows` says which; build them with
    `distributed.local_rows`), and `jax.make_array_from_process_local_data` assembles the
    global array: no process ever builds another's rows.
    """
    def place(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(place, batch)
