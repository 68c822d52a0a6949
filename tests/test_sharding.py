import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cloc_jax import sharding
from cloc_jax.train import build, init_state
from tests.conftest import tiny_config


def test_mesh_fills_the_minus_one_axis_with_auto_axis_types(config):
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


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
