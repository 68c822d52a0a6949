import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cloc_jax import sharding
from cloc_jax.train import abstract_state, build, init_state
from tests.conftest import tiny_config


def test_mesh_fills_the_minus_one_axis_with_auto_axis_types(config):
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_max_fsdp_moves_the_devices_beyond_it_to_data_parallelism():
    mesh = lambda **m: dict(sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, **m)).shape)  # noqa: E731
    assert mesh(max_fsdp=256) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh(max_fsdp=4) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh(max_fsdp=3) == {"data": 4, "fsdp": 2, "tensor": 1}  # the largest divisor of 8 within the cap
    assert mesh(max_fsdp=0) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(data=3, fsdp=1, tensor=1), "needs 3 devices, found 8"),
        (dict(data=-1, fsdp=3, tensor=1), "does not divide 8 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
    ],
)
def test_bad_meshes_fail_with_one_line(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(sizes)


def test_batch_must_divide_data_parallel_devices(config):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by 4 data-parallel devices"):
        sharding.check_batch_size(30, mesh)


def test_axis_rules_place_parameters_and_batches():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config.mesh)
    _, model, tx = build(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
    fc1 = state.params["image"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (4, 64, 256)
    assert state.params["text"]["token_embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    batch = sharding.global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(8, 2))


def test_fsdp_moves_to_a_dimension_it_divides_and_never_to_the_layers_axis():
    """8 fsdp devices, a width (12) they do not divide: the fsdp axis goes to the largest other dimension it
    divides; tensor axes that do not divide stay replicated; a stack's layers axis never takes fsdp."""
    mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}).mesh)
    assert sharding.fit_spec(P("fsdp", None), (12, 48), mesh, movable=(0, 1)) == P(None, "fsdp")
    assert sharding.fit_spec(P("fsdp", None, None), (12, 16, 32), mesh, movable=(0, 1, 2)) == P(None, None, "fsdp")
    assert sharding.fit_spec(P(None, "fsdp", None), (8, 12, 5), mesh, movable=(1, 2)) == P(None, None, None)
    assert sharding.fit_spec(P("fsdp", "tensor"), (16, 12), mesh, movable=(0, 1)) == P("fsdp", "tensor")


def test_replicated_arrays_lists_what_fsdp_did_not_split():
    """A tiny model on fsdp=8 whose text tower (width 12) no mesh axis divides along its embed axis: the fc1
    kernel [layers, 12, 48] is split along its MLP axis instead; arrays with no dimension 8 divides are listed."""
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1})
    config.model.text.update(width=12, heads=2, mlp_dim=48)
    mesh = sharding.make_mesh(config.mesh)
    _, model, tx = build(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        _, shapes = abstract_state(config, model, tx, mesh)
    fc1 = shapes.params["text"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape[1:] == (12, 48) and fc1.sharding.spec == P(None, None, ("tensor", "fsdp"))  # tensor is 1 here
    rows = sharding.replicated_arrays(shapes, min_bytes=1024)
    paths = [path for path, _, _ in rows]
    assert "params/text/encoder/blocks/attn/query/kernel" in paths  # [layers, 12, 2, 6]: nothing 8 divides
    assert not any(p.endswith("kernel") and ("fc1" in p or "image/encoder" in p) for p in paths)  # biases: tensor
    assert [size for _, _, size in rows] == sorted((size for _, _, size in rows), reverse=True)
    assert all(size == int(np.prod(shape)) * 4 for path, shape, size in rows if path.startswith("params/"))
    assert sharding.replicated_arrays(shapes, min_bytes=2**30) == []
