"""Mesh and logical-axis sharding: the config's `axis_rules` are the only place that decides layout.

Meshes use Auto axis types: the models place `with_logical_constraint` hints and XLA's partitioner
propagates the rest, which is what the logical-rules style (MaxText, big_vision) is written for.
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """`mesh.data/fsdp/tensor` sizes; at most one may be -1 (= all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, found {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} is not divisible by {n} data-parallel devices")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """A tree of nn.LogicallyPartitioned (e.g. from jax.eval_shape of init) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def unbox(tree):
    """Drops logical-axis metadata boxes without adding sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
