"""UMG-CLIP tag supervision: Smooth L1 against multi-hot targets (float64 reference), only over images whose
source has tags, and a step with tags."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cloc_jax.data import pipeline
from cloc_jax.losses import tag_loss, training_loss
from cloc_jax.models.build import example_batch
from cloc_jax.models.spec import from_config
from cloc_jax.tokenizers import ByteTokenizer
from cloc_jax.train import build
from tests.conftest import tiny_config
from tests.data import fixtures
from tests.test_region_losses import clip_reference, region_reference

IMAGE_TAGS = ml_collections.ConfigDict(dict(image_weight=1.0, region_weight=0.0, beta=0.1))


def _smooth_l1(x, beta):
    return np.where(np.abs(x) < beta, 0.5 * x**2 / beta, np.abs(x) - 0.5 * beta)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_tag_loss_matches_a_float64_reference_with_masking():
    rng = np.random.default_rng(0)
    z, ztag = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(5, 8)))
    target = (rng.random((6, 5)) < 0.4).astype(np.float64)  # overlapping labels: several tags per row
    valid = np.array([1, 1, 0, 1, 0, 1], bool)
    total = 0.0
    for r in np.flatnonzero(valid):
        for t in range(5):
            total += _smooth_l1(z[r] @ ztag[t] - target[r, t], 0.1)
    want = total / (valid.sum() * 5)
    got = tag_loss(*(jnp.asarray(a, jnp.float32) for a in (z, ztag, target)), jnp.asarray(valid), 0.1)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_training_loss_adds_weighted_image_and_region_tag_terms():
    rng = np.random.default_rng(1)
    out = dict(
        zimg=_unit(rng.normal(size=(2, 8))),
        ztxt=_unit(rng.normal(size=(2, 8))),
        scale=10.0,
        zregion=_unit(rng.normal(size=(2, 3, 8))),
        zregion_text=_unit(rng.normal(size=(2, 3, 8))),
        ztag=_unit(rng.normal(size=(4, 8))),
    )
    batch = dict(
        boxes=np.tile(np.array([0.1, 0.1, 0.5, 0.5], np.float32), (2, 3, 1)),
        region_mask=np.array([[1, 1, 0], [1, 0, 0]], bool),
        region_labels=np.array([[2, 0, -1], [3, -1, -1]]),
        image_tags=np.array([[1, 0, 1, 0], [0, 0, 0, 1]], np.float32),
        image_tags_valid=np.ones(2, bool),
    )
    out32, batch32 = jax.tree.map(jnp.asarray, (out, batch))
    region_cfg = ml_collections.ConfigDict(dict(weight=1.0, filter_threshold=0.9, grounding="l2", grounding_weight=1.0))
    tags = ml_collections.ConfigDict(dict(image_weight=0.5, region_weight=2.0, beta=0.1))
    loss, parts = training_loss(out32, batch32, region_cfg, tags=tags)
    # float64 references: both images are tagged; the regions with a class are (0, 0): 2, (0, 1): 0, (1, 0): 3.
    image = np.mean(_smooth_l1(out["zimg"] @ out["ztag"].T - batch["image_tags"], 0.1))
    labelled = out["zregion"][[0, 0, 1], [0, 1, 0]]
    region = np.mean(_smooth_l1(labelled @ out["ztag"].T - np.eye(4)[[2, 0, 3]], 0.1))
    valid = batch["region_mask"].reshape(-1)
    region_text = region_reference(out["zregion"].reshape(6, 8), out["zregion_text"].reshape(6, 8), valid, 10.0, 0.9)
    base = clip_reference(out["zimg"], out["ztxt"], 10.0) + 1.0 * region_text  # lambda: both images have regions
    assert float(parts["loss/image_tags"]) == pytest.approx(image, rel=1e-5)
    assert float(parts["loss/region_tags"]) == pytest.approx(region, rel=1e-5)
    assert float(loss) == pytest.approx(base + 0.5 * image + 2.0 * region, rel=1e-5)


def test_pipeline_makes_multi_hot_image_tags_from_the_objects():
    config = tiny_config(**{"tags.image_weight": 1.0})
    tokenizer, _, _ = build(config)
    batch = next(pipeline.train_iterator(config, tokenizer))
    source = pipeline.make_source(config.data, "train", config.image_size)
    assert batch["image_tags"].shape == (16, len(source.class_names))
    for row in range(16):
        record = source[int(batch["index"][row])]
        assert set(np.flatnonzero(batch["image_tags"][row])) == set(record["region_labels"].tolist())
    assert batch["image_tags_valid"].dtype == bool and batch["image_tags_valid"].all()  # scenes have tags
    assert pipeline.tag_vocabulary(config, tokenizer).shape == (len(source.class_names), 24)


def test_region_tags_without_regions_are_one_line():
    out = dict(zimg=jnp.ones((2, 4)) / 2, ztxt=jnp.ones((2, 4)) / 2, scale=1.0, ztag=jnp.ones((3, 4)) / 2)
    tags = ml_collections.ConfigDict(dict(image_weight=0.0, region_weight=1.0, beta=0.1))
    with pytest.raises(ValueError, match="needs region embeddings"):
        training_loss(out, dict(region_labels=jnp.zeros((2, 1), int)), None, tags=tags)


def _image_tag_loss(batch: dict, e: int = 8, seed: int = 0) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(loss/image_tags of training_loss, its float64 reference over the valid rows, zimg, ztag) for
    random unit embeddings."""
    rng = np.random.default_rng(seed)
    b, t = batch["image_tags"].shape
    zimg, ztag = _unit(rng.normal(size=(b, e))), _unit(rng.normal(size=(t, e)))
    out = dict(zimg=zimg, ztxt=_unit(rng.normal(size=(b, e))), scale=10.0, ztag=ztag)
    fields = {k: batch[k] for k in ("image_tags", "image_tags_valid")}
    _, parts = training_loss(*jax.tree.map(jnp.asarray, (out, fields)), None, tags=IMAGE_TAGS)
    rows = np.flatnonzero(batch["image_tags_valid"])
    want = np.mean(_smooth_l1(zimg[rows] @ ztag.T - batch["image_tags"][rows], 0.1)) if len(rows) else 0.0
    return float(parts["loss/image_tags"]), want, zimg, ztag


def test_a_mixture_with_an_untagged_source_scores_only_the_tagged_images(tmp_path):
    coco = fixtures.coco_captions_only(fixtures.write_coco(str(tmp_path), fixtures.scene_records(8)))
    config = tiny_config(**{"data.train": f"0.5*scenes + 0.5*{coco}", "tags.image_weight": 1.0})
    batch = next(pipeline.train_iterator(config, ByteTokenizer()))
    source = pipeline.make_source(config.data, "train", config.image_size)
    from_scenes = np.array([isinstance(source[int(i)]["image"], np.ndarray) for i in batch["index"]])
    np.testing.assert_array_equal(batch["image_tags_valid"], from_scenes)  # coco captions: untagged
    assert 0 < from_scenes.sum() < len(from_scenes) and not batch["image_tags"][~from_scenes].any()
    got, want, zimg, ztag = _image_tag_loss(batch)
    assert got == pytest.approx(want, rel=1e-5)
    every_row = np.mean(_smooth_l1(zimg @ ztag.T - batch["image_tags"], 0.1))
    assert got != pytest.approx(every_row, rel=1e-3)  # what counting the untagged images gave


def test_a_batch_without_tagged_images_has_no_image_tag_loss_or_gradient():
    batch = dict(image_tags=np.zeros((4, 5), np.float32), image_tags_valid=np.zeros(4, bool))
    got, want, zimg, ztag = _image_tag_loss(batch)
    assert (got, want) == (0.0, 0.0)

    def loss(zimg, ztag):
        out = dict(zimg=zimg, ztxt=zimg, scale=10.0, ztag=ztag)
        return training_loss(out, jax.tree.map(jnp.asarray, batch), None, tags=IMAGE_TAGS)[1]["loss/image_tags"]

    grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(zimg, jnp.float32), jnp.asarray(ztag, jnp.float32))
    for grad in grads:
        assert np.isfinite(grad).all() and not np.any(grad)


@pytest.mark.parametrize("name", ["cloc_tiny", "umg_tiny"])
def test_the_pipeline_makes_the_example_batch(name):
    """Every field of the batch contract (`build.example_batch`, what the step reads) comes out of the pipeline
    with its shape and dtype; the rest of a pipeline batch is bookkeeping the step never reads."""
    config = tiny_config(name)
    tokenizer = ByteTokenizer()
    real = next(pipeline.train_iterator(config, tokenizer))
    tags = pipeline.tag_vocabulary(config, tokenizer)
    example = example_batch(
        from_config(config), config.batch_size, config.data.max_regions, 0 if tags is None else len(tags)
    )
    assert ("image_tags" in example) == (name == "umg_tiny")
    for key, value in example.items():
        assert (real[key].shape, real[key].dtype) == (value.shape, value.dtype), key
    assert set(real) - set(example) == {"index", "label", "referring_tokens"}
