"""Mesh and logical-axis sharding: the config's `axis_rules` are the only place that decides layout.

Meshes use Auto axis types: the models place `with_logical_constraint` hints and XLA's partitioner
propagates the rest, which is what the logical-rules style (MaxText, big_vision) is written for.
Across TPU slices (or GPU hosts) the `data` axis is extended over the data-centre network (DCN):
`mesh.slices` copies of the in-slice mesh, so only data-parallel gradients cross the slow links.
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _ici_sizes(mesh: ml_collections.ConfigDict, per_slice: int) -> list[int]:
    """In-slice axis sizes; at most one may be -1 (= all remaining devices of a slice)."""
    sizes = [int(mesh[a]) for a in MESH_AXES]
    described = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {described}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if per_slice % known:
            raise ValueError(f"mesh {described} does not divide {per_slice} devices")
        sizes[sizes.index(-1)] = per_slice // known
    if int(np.prod(sizes)) != per_slice:
        raise ValueError(f"mesh {described} needs {int(np.prod(sizes))} devices, found {per_slice}")
    return sizes


def _granules(devices: list) -> int:
    """Units joined by DCN: TPU slices when devices know theirs, else processes (GPU hosts)."""
    if hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def make_mesh(mesh: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """`mesh.data/fsdp/tensor` within a slice, times `mesh.slices` (default 1) data-parallel over DCN."""
    devices = jax.devices() if devices is None else list(devices)
    slices = int(mesh.get("slices", 1))
    if slices < 1 or len(devices) % slices:
        raise ValueError(f"mesh.slices={slices} does not divide {len(devices)} devices")
    ici = _ici_sizes(mesh, len(devices) // slices)
    types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        try:
            return jax.make_mesh(tuple(ici), MESH_AXES, axis_types=types, devices=devices)
        except AssertionError:  # libtpu's abstract v4 lists both cores of a chip: no physical layout known
            return Mesh(np.asarray(devices).reshape(ici), MESH_AXES, axis_types=types)
    if _granules(devices) != slices:
        raise ValueError(f"mesh.slices={slices} but the devices form {_granules(devices)} slice(s)/host(s)")
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, [slices, 1, 1], devices, process_is_granule=not hasattr(devices[0], "slice_index")
    )
    return Mesh(grid, MESH_AXES, axis_types=types)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} is not divisible by {n} data-parallel devices")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicates the dimensions a mesh axis does not divide (e.g. 12 heads on tensor=8): jit
    arguments must shard evenly, and a replicated small tensor beats a compile error."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(axes if names and dim % int(np.prod([mesh.shape[a] for a in names])) == 0 else None)
    return PartitionSpec(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """A tree of nn.LogicallyPartitioned (e.g. from jax.eval_shape of init) -> NamedShardings."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        specs,
        unbox(boxed_tree),
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def unbox(tree):
    """Drops logical-axis metadata boxes without adding sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
