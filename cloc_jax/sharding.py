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
# The default mesh: every device data-parallel (`config.mesh`; one axis may be -1 = the rest).
DATA_PARALLEL = dict(data=-1, fsdp=1, tensor=1, slices=1, max_fsdp=0)


def _ici_sizes(mesh: ml_collections.ConfigDict, per_slice: int) -> list[int]:
    """In-slice axis sizes; at most one may be -1 (= all remaining devices of a slice). `max_fsdp` > 0 caps
    fsdp, moving the factor beyond it to data (fsdp=-1, max_fsdp=256: 4 x 256 on 1,024 devices, 1 x 8 on 8)."""
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
    cap = int(mesh.get("max_fsdp", 0) or 0)
    if cap > 0 and sizes[1] > cap:  # fsdp over the largest divisor within the cap, data parallel over the rest
        fsdp = max(d for d in range(1, cap + 1) if sizes[1] % d == 0)
        sizes = [sizes[0] * sizes[1] // fsdp, fsdp, sizes[2]]
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
        except NotImplementedError:  # an axis that must span torus axes in part (fsdp=256 on v5p:8x8x16)
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=types)
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


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, movable: tuple[int, ...] = ()) -> PartitionSpec:
    """Fits a parameter's mesh axes to its shape: jit arguments must shard evenly. A dimension its mesh axes
    do not divide is replicated (12 heads on tensor=8). FSDP only stores a parameter in pieces, so the `fsdp`
    axis of such a dimension moves to the largest dimension in `movable` it divides, beside that dimension's
    own axes (a 768-wide text tower on 1,024 chips shards its 3,072-wide MLP instead of staying whole)."""
    size = lambda names: int(np.prod([mesh.shape[a] for a in names]))  # noqa: E731
    out, dropped = [], []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        fits = dim % size(names) == 0
        out.append(names if fits else ())
        dropped += [] if fits else [a for a in names if a == "fsdp" and mesh.shape[a] > 1]
    for axis in dropped:
        free = [i for i in movable if "fsdp" not in out[i] and shape[i] % (size(out[i]) * mesh.shape[axis]) == 0]
        if free:
            i = max(free, key=lambda i: shape[i])
            out[i] = (*out[i], axis)
    return PartitionSpec(*(None if not n else n[0] if len(n) == 1 else n for n in out))


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """A tree of nn.LogicallyPartitioned (e.g. from jax.eval_shape of init) -> NamedShardings. A scanned
    stack's `layers` dimension never takes a moved axis (each layer's step slices it)."""
    names = nn.get_partition_spec(boxed_tree)
    specs = nn.logical_to_mesh(names, rules)
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    movable = lambda logical: tuple(i for i, n in enumerate(logical) if n != "layers")  # noqa: E731
    return jax.tree.map(
        lambda spec, logical, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh, movable(logical))),
        specs,
        names,
        unbox(boxed_tree),
        is_leaf=is_spec,
    )


def replicated_arrays(shapes, min_bytes: int = 2**20) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, bytes) of every array of `shapes` (ShapeDtypeStructs with NamedShardings, e.g. the
    abstract TrainState) of at least `min_bytes` that each device of a multi-device mesh holds whole,
    largest first: what FSDP was meant to split and did not."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        size = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        if size >= min_bytes and len(x.sharding.device_set) > 1 and x.sharding.is_fully_replicated:
            out.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape), size))
    return sorted(out, key=lambda row: -row[2])


def unbox(tree):
    """Drops logical-axis metadata boxes without adding sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
