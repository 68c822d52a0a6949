import flax.linen as nn
import jax
import numpy as np
import pytest

from cloc_jax.models.build import build, example_batch, model_inputs
from cloc_jax.models.spec import from_config
from tests.conftest import tiny_config


def dummy_batch(config, n):
    return example_batch(from_config(config), n, config.data.max_regions)


def _init(config):
    model = build(from_config(config).replace(**{"model.text.vocab_size": 384}))
    return model, model.init(jax.random.key(0), **model_inputs(model, dummy_batch(config, 2)))


def test_every_parameter_carries_logical_axis_names(config):
    _, variables = _init(config)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)
    names = {n for x in leaves for n in x.names}
    assert {"embed", "mlp", "heads", "vocab", "layers"} <= names


@pytest.mark.parametrize("loss,has_bias", [("softmax", False), ("sigmoid", True)])
def test_outputs_are_unit_embeddings_with_temperature(loss, has_bias):
    config = tiny_config(**{"model.loss": loss})
    model, variables = _init(config)
    batch = dummy_batch(config, 2)
    out = model.apply(variables, **model_inputs(model, {**batch, "tokens": batch["tokens"].at[:, 0].set(1)}))
    assert out["zimg"].shape == out["ztxt"].shape == (2, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=-1), 1.0, rtol=1e-5)
    assert out["grid"].shape == (2, 4, 4, 128)
    assert ("bias" in out) == has_bias
    assert float(out["scale"]) == pytest.approx(1 / 0.07 if loss == "softmax" else 10.0, rel=1e-5)


def test_scan_and_unrolled_layers_compute_the_same_function():
    scanned = tiny_config(**{"model.scan": True, "model.remat": "full"})
    model_s, variables = _init(scanned)
    model_u, unrolled_vars = _init(tiny_config(**{"model.scan": False}))
    params = nn.unbox(variables["params"])
    unrolled = nn.unbox(unrolled_vars["params"])
    for tower in ("image", "text"):
        blocks = params[tower]["encoder"].pop("blocks")
        depth = jax.tree.leaves(blocks)[0].shape[0]
        for i in range(depth):
            params[tower]["encoder"][f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    assert jax.tree.structure(params) == jax.tree.structure(unrolled)
    batch = dummy_batch(scanned, 2)
    batch["image"] = jax.random.normal(jax.random.key(3), batch["image"].shape)
    batch["tokens"] = batch["tokens"].at[:, :3].set(7)
    a = model_s.apply(variables, **model_inputs(model_s, batch))
    b = model_u.apply({"params": params}, **model_inputs(model_s, batch))
    np.testing.assert_allclose(a["zimg"], b["zimg"], atol=1e-5)
    np.testing.assert_allclose(a["ztxt"], b["ztxt"], atol=1e-5)


def test_image_size_must_divide_by_patch():
    config = tiny_config(image_size=36)
    with pytest.raises(ValueError, match="image_size=36 is not divisible by the patch size 8"):
        _init(config)


def test_bfloat16_activations_keep_float32_parameters_and_embeddings():
    config = tiny_config(**{"model.dtype": "bfloat16"})
    model, variables = _init(config)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables["params"]))} == {np.dtype("float32")}
    batch = dummy_batch(config, 2)
    out = model.apply(variables, **model_inputs(model, {**batch, "tokens": batch["tokens"].at[:, 0].set(1)}))
    assert out["zimg"].dtype == out["ztxt"].dtype == np.float32
    assert out["grid"].dtype == jax.numpy.bfloat16


def test_packed_region_texts_give_the_same_outputs(config):
    """tokenizer.region_pack_length changes the text tower's layout in training, not what it computes."""
    model, variables = _init(config)
    spec = from_config(config).replace(**{"model.text.vocab_size": 384, "tokenizer.region_pack_length": 24})
    packed = build(spec)
    batch = dummy_batch(config, 2)
    m = batch["region_tokens"].shape[1]
    lengths = np.array([[3, 0, 5, 2][:m], [6, 4, 0, 1][:m]])  # 10 and 11 tokens: they fit in 24
    region_tokens = np.zeros(batch["region_tokens"].shape, np.int32)
    for b, i in np.ndindex(lengths.shape):
        region_tokens[b, i, : lengths[b, i]] = np.arange(lengths[b, i]) + 5
    inputs = model_inputs(model, {**batch, "region_tokens": region_tokens})
    out, out_packed = model.apply(variables, **inputs), packed.apply(variables, **inputs)
    nonempty = lengths > 0
    np.testing.assert_allclose(out_packed["zregion_text"][nonempty], out["zregion_text"][nonempty], atol=2e-5)
    np.testing.assert_allclose(out_packed["pred_boxes"][nonempty], out["pred_boxes"][nonempty], atol=2e-5)
    np.testing.assert_array_equal(out_packed["zregion"], out["zregion"])
