"""PET: Convpass against a hand-written reference, zero-init adapters change nothing, and adaptation
from an exported model trains only the adapters and the image head."""

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cloc_jax.checkpoint import Checkpoints
from cloc_jax.models.adapters import Convpass
from cloc_jax.models.vit import merge_clustered_encoder
from cloc_jax.train import train_and_evaluate
from cloc_jax.weights import load
from tests.conftest import ROOT, make_vit, tiny_config


def _gelu(x):
    return np.asarray(jax.nn.gelu(jnp.asarray(x)))


def test_convpass_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1 + 3 * 4, 6)).astype(np.float32)  # one prefix token + a 3 x 4 grid
    module = Convpass(dim=5, grid=(3, 4))
    params = nn.unbox(module.init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.3, params)
    p = params["params"]
    down = _gelu(x @ p["down"]["kernel"] + p["down"]["bias"])
    kernel = p["conv"]["kernel"]  # [3, 3, in, out]
    want_mid = np.zeros((2, 13, 5), np.float32)
    grid = down[:, 1:].reshape(2, 3, 4, 5)
    for i in range(3):
        for j in range(4):
            acc = np.zeros((2, 5), np.float32) + p["conv"]["bias"]
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < 3 and 0 <= j + dj < 4:
                        acc += grid[:, i + di, j + dj] @ kernel[di + 1, dj + 1]
            want_mid[:, 1 + i * 4 + j] = acc
    want_mid[:, 0] = down[:, 0] @ kernel[1, 1] + p["conv"]["bias"]  # a prefix token is a 1 x 1 image
    want = _gelu(want_mid) @ p["up"]["kernel"] + p["up"]["bias"]
    got = module.apply(params, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_zero_initialised_adapters_leave_a_pretrained_vit_unchanged():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, pool="cls")
    adapted = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, pool="cls", adapter_dim=8)
    base = plain.init(jax.random.key(0), images)
    with_adapters = adapted.init(jax.random.key(2), images)
    merged = flax.traverse_util.flatten_dict(with_adapters)
    merged.update(flax.traverse_util.flatten_dict(base))
    merged = flax.traverse_util.unflatten_dict(merged)
    np.testing.assert_allclose(adapted.apply(merged, images)[0], plain.apply(base, images)[0], atol=1e-6)


def test_adaptation_trains_only_adapters_and_the_image_head(tmp_path):
    # a umg_tiny trained with token clustering and exported (tests/fixtures/v0: shared, 0.2 MB), at its sizes
    exported, adapt = os.path.join(ROOT, "tests", "fixtures", "v0", "umg_export"), str(tmp_path / "adapt")
    with open(os.path.join(ROOT, "tests", "fixtures", "v0", "umg_config.json")) as f:
        made = json.load(f)["overrides"]  # what how_made.py trained it with
    sizes = {k: v for k, v in made.items() if k.startswith(("model.image.", "model.text.", "model.embed"))}
    sizes.pop("model.image.cluster_layer")  # a training key: the adaptation runs without clustering
    config = tiny_config("umg_tiny_pet", num_steps=3, checkpoint_every=3, init_from=exported, **sizes)
    config.optim.update(lr=1e-2)
    train_and_evaluate(config, adapt)
    before = flax.traverse_util.flatten_dict(load(exported).params, sep="/")
    assert any("encoder_clustered" in k for k in before)  # pretrained with clustering, adapted without
    before = merge_clustered_encoder(before)
    restore = ocp.args.Composite(state=ocp.args.StandardRestore())
    state = Checkpoints(adapt).manager.restore(3, args=restore)["state"]
    after = flax.traverse_util.flatten_dict(state["params"], sep="/")
    trained = [k for k in after if any(p in k for p in config.optim.trainable)]
    assert any("adapter" in k for k in trained) and any("map_head" in k for k in trained)
    for key, value in after.items():
        if key in trained:
            if key.endswith("up/kernel") or ("map_head" in key and key.endswith("kernel")):
                assert not np.allclose(value, before.get(key, 0.0)), key  # it really trained
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)  # frozen: bit for bit
    assert os.path.exists(os.path.join(adapt, "metrics.jsonl"))
