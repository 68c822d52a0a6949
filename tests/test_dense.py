"""Dense adaptation: Hungarian matching against scipy, the mask losses against float64 NumPy, inference on
hand-made logits, the decoder's shapes and masked attention, targets from a masked batch, and a CI-length run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_assignment

from cloc_jax.evals import masks as inference
from cloc_jax.evals.dense import labelled_segments, segments_of_classes
from cloc_jax.mask_losses import MaskLossWeights, dice_loss, mask_bce, pairwise_mask_costs, set_losses
from cloc_jax.matching import linear_sum_assignment
from cloc_jax.models.mask_decoder import MaskDecoder, class_logits
from cloc_jax.train.dense import TargetSpec, targets
from tests.conftest import ROOT

assign = jax.jit(jax.vmap(linear_sum_assignment))


@pytest.mark.parametrize("targets_, queries", [(1, 1), (4, 4), (5, 16), (9, 12), (30, 100)])
def test_hungarian_equals_scipy(targets_, queries):
    costs = np.random.default_rng(targets_ * queries).normal(size=(6, targets_, queries)).astype(np.float32)
    got = np.asarray(assign(jnp.asarray(costs)))
    for cost, found in zip(costs, got):
        np.testing.assert_array_equal(found, scipy_assignment(cost.astype(np.float64))[1])


def test_hungarian_ties_and_padding_rows():
    """Integer costs (many optima): the same total as scipy, one query each. Constant padding rows leave the real
    rows' assignment optimal."""
    rng = np.random.default_rng(1)
    costs = rng.integers(0, 4, size=(12, 6, 9)).astype(np.float32)
    got = np.asarray(assign(jnp.asarray(costs)))
    for cost, found in zip(costs, got):
        rows, cols = scipy_assignment(cost)
        assert cost[np.arange(6), found].sum() == cost[rows, cols].sum()
        assert len(set(found.tolist())) == 6
    real = rng.normal(size=(3, 8)).astype(np.float32)
    padded = np.concatenate([real, np.zeros((3, 8), np.float32)])
    np.testing.assert_array_equal(np.asarray(assign(padded[None]))[0, :3], scipy_assignment(real)[1])
    with pytest.raises(ValueError, match="at least as many queries"):
        linear_sum_assignment(jnp.zeros((5, 4)))


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_mask_losses_equal_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(7, 50))
    targets_ = (rng.random((4, 50)) > 0.6) * rng.random((4, 50))  # soft area fractions
    p = _np_sigmoid(logits)
    bce = np.array([[np.mean(-(t * np.log(pi) + (1 - t) * np.log(1 - pi))) for pi in p] for t in targets_])
    dice = np.array([[1 - (2 * (pi * t).sum() + 1) / (pi.sum() + t.sum() + 1) for pi in p] for t in targets_])
    got_bce, got_dice = pairwise_mask_costs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets_, jnp.float32))
    np.testing.assert_allclose(got_bce, bce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_dice, dice, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mask_bce(jnp.asarray(logits[:4]), jnp.asarray(targets_)), np.diag(bce[:, :4]), 1e-5)
    np.testing.assert_allclose(dice_loss(jnp.asarray(logits[:4]), jnp.asarray(targets_)), np.diag(dice[:, :4]), 1e-5)


def test_set_losses_equal_a_numpy_matcher():
    """The batch losses against NumPy float64: Mask2Former's cost matched by scipy, void-weighted cross-entropy over
    every query, mask terms over the matched pairs / the batch's number of targets."""
    rng = np.random.default_rng(2)
    b, q, c, g, pixels = 2, 6, 5, 3, 40
    cls = rng.normal(size=(b, q, c + 1))
    masks = rng.normal(0, 2, size=(b, q, pixels))
    labels = rng.integers(0, c, size=(b, g)).astype(np.int32)
    tgt = (rng.random((b, g, pixels)) > 0.5).astype(np.float64)
    valid = np.array([[True, True, False], [True, False, False]])
    w = MaskLossWeights()
    nll_sum = weight_sum = mask_sum = dice_sum = 0.0
    for i in range(b):
        probs = np.exp(cls[i]) / np.exp(cls[i]).sum(-1, keepdims=True)
        p = _np_sigmoid(masks[i])
        wanted = np.full(q, c)
        real = np.flatnonzero(valid[i])
        bce = np.array([[np.mean(-(tt * np.log(pi) + (1 - tt) * np.log(1 - pi))) for pi in p] for tt in tgt[i, real]])
        dice = np.array([[1 - (2 * (pi * t).sum() + 1) / (pi.sum() + t.sum() + 1) for pi in p] for t in tgt[i, real]])
        cost = -w.classification * probs[:, labels[i, real]].T + w.mask * bce + w.dice * dice
        _, chosen = scipy_assignment(cost)
        wanted[chosen] = labels[i, real]
        for k, qi in enumerate(chosen):
            mask_sum += bce[k, qi]
            dice_sum += dice[k, qi]
        weights = np.where(wanted == c, w.void, 1.0)
        nll_sum += (weights * -np.log(probs[np.arange(q), wanted])).sum()
        weight_sum += weights.sum()
    inputs = (cls, masks, labels, tgt, valid)
    got = set_losses(*(jnp.asarray(x, jnp.float32 if x.dtype == np.float64 else None) for x in inputs), w)
    np.testing.assert_allclose(got["classification"], nll_sum / weight_sum, rtol=1e-5)
    np.testing.assert_allclose(got["mask"], mask_sum / valid.sum(), rtol=1e-5)
    np.testing.assert_allclose(got["dice"], dice_sum / valid.sum(), rtol=1e-5)


def test_ensemble_is_fc_clips_geometric_mean():
    in_vocab = np.log(np.array([[0.5, 0.2, 0.1, 0.2]]))  # classes a, b, c, then void
    out_vocab = np.log(np.array([[0.1, 0.3, 0.6]]))
    seen = np.array([True, True, False])
    got = inference.ensemble(in_vocab, out_vocab, seen)
    mixed = np.array([0.5**0.6 * 0.1**0.4, 0.2**0.6 * 0.3**0.4, 0.1**0.2 * 0.6**0.8])
    np.testing.assert_allclose(got[0], [*(mixed / mixed.sum() * 0.8), 0.2])
    np.testing.assert_allclose(inference.ensemble(in_vocab, None, seen)[0], [0.5, 0.2, 0.1, 0.2])


def test_semantic_and_panoptic_inference_on_hand_made_logits():
    """Three queries on a 2 x 4 image: a thing class 0 on the left half, a second instance of class 0 at the top
    right, stuff class 2 everywhere else; a fourth query is void."""
    big = 20.0
    left = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)
    top_right = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], bool)
    bottom_right = ~left & ~top_right
    masks = np.stack([np.where(m, big, -big) for m in (left, top_right, bottom_right, left)])
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.85, 0.1, 0.03, 0.02], [0.01, 0.04, 0.9, 0.05], [0, 0, 0.05, 0.95]])
    scores = inference.semantic_scores(probs, masks)
    np.testing.assert_array_equal(scores.argmax(-1), [[0, 0, 0, 0], [0, 0, 2, 2]])
    # pixel (0, 0): query 0's classes plus the void query's non-void ones (0.05 of class 2)
    np.testing.assert_allclose(scores[0, 0], [0.9, 0.05, 0.03 + 0.05], atol=1e-6)
    ids, segments = inference.panoptic(probs, masks, things=np.array([True, True, False]))
    np.testing.assert_array_equal(ids, [[1, 1, 2, 2], [1, 1, 3, 3]])
    assert segments == {
        1: dict(category_id=0, isthing=True, iscrowd=0),
        2: dict(category_id=0, isthing=True, iscrowd=0),
        3: dict(category_id=2, isthing=False, iscrowd=0),
    }
    # a query whose score is under the threshold makes no segment; one mostly covered by another is dropped
    ids, segments = inference.panoptic(probs, masks, np.array([True, True, False]), object_threshold=0.87)
    np.testing.assert_array_equal(ids, [[1, 1, 0, 0], [1, 1, 2, 2]])
    covered = np.stack([masks[0], np.where(left | top_right, big, -big)])
    ids, _ = inference.panoptic(probs[:2] * [1, 1, 1, 1], covered, np.array([True, True, False]), 0.8, 0.8)
    np.testing.assert_array_equal(ids, [[1, 1, 0, 0], [1, 1, 0, 0]])  # query 2 keeps 2 of its 6 pixels: < 0.8


def test_ground_truth_and_training_free_segments():
    row = dict(
        region_masks=np.array([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]], [[0, 0, 1], [0, 0, 0]]], bool),
        region_labels=np.array([3, 1, 0]),
        region_mask=np.array([True, True, False]),
        semantic=np.array([[3, 3, 2], [2, -1, 1]]),
    )
    ids, segments = labelled_segments(row, things=np.array([True, True, False, True]), stuff=np.array([2]))
    np.testing.assert_array_equal(ids, [[1, 1, 3], [3, 0, 2]])
    assert [s["category_id"] for s in segments.values()] == [3, 1, 2]
    ids, segments = segments_of_classes(np.array([[0, 0, 1, 0], [1, 1, 1, 0]]), np.array([True, False]))
    np.testing.assert_array_equal(ids, [[1, 1, 3, 2], [3, 3, 3, 2]])  # class 0: two components; stuff 1: one
    assert [s["category_id"] for s in segments.values()] == [0, 0, 1]


def test_targets_from_a_masked_batch():
    """Instances: area fractions at the mask resolution, labels into the seen classes (unseen: invalid); stuff: one
    region per class from the label map."""
    masks = np.zeros((1, 2, 4, 4), bool)
    masks[0, 0, :2, :1] = True  # covers half of the top-left 2 x 2 cell
    masks[0, 1, 2:, 2:] = True
    semantic = np.full((1, 4, 4), 2, np.int32)
    semantic[0, 0, :] = -1  # unlabelled top row
    batch = dict(
        region_masks=jnp.asarray(masks),
        region_labels=jnp.asarray([[0, 1]]),
        region_mask=jnp.asarray([[True, True]]),
        has_masks=jnp.asarray([True]),
        semantic=jnp.asarray(semantic),
        has_semantic=jnp.asarray([True]),
    )
    spec = TargetSpec(remap=np.array([0, -1, 1, -1], np.int32), stuff=np.array([2], np.int32))  # class 1 unseen
    labels, got, valid = targets(batch, spec, (2, 2))
    np.testing.assert_array_equal(labels, [[0, -1, 1]])
    np.testing.assert_array_equal(valid, [[True, False, True]])
    np.testing.assert_allclose(got[0, 0], [0.5, 0, 0, 0])
    np.testing.assert_allclose(got[0, 2], [0.5, 0.5, 1, 1])


def test_area_weights_average_exactly_at_any_ratio():
    """A 7 x 7 mask to 2 x 2 cells (3.5 pixels a cell, like a 14 px patch's quarter): the same as repeating every
    pixel 2 x 2 and averaging 7 x 7 blocks."""
    from cloc_jax.train.dense import _area

    mask = np.random.default_rng(0).random((1, 1, 7, 7)) > 0.5
    fine = np.kron(mask[0, 0], np.ones((2, 2)))
    want = fine.reshape(2, 7, 2, 7).mean((1, 3))
    np.testing.assert_allclose(_area(jnp.asarray(mask, jnp.float32), (2, 2))[0, 0], want, rtol=1e-6)


def test_decoder_shapes_and_masked_attention_sees_everything_for_an_empty_mask():
    decoder = MaskDecoder(num_queries=5, dim=16, layers=2, heads=2, mlp_dim=32, embed_dim=8)
    grid = jax.random.normal(jax.random.key(0), (2, 4, 6, 24))
    params = decoder.init(jax.random.key(1), grid)["params"]
    out = jax.jit(decoder.apply)({"params": params}, grid)
    assert out["masks"].shape == (3, 2, 5, 16, 24) and out["classes"].shape == (3, 2, 5, 8)
    np.testing.assert_allclose(jnp.linalg.norm(out["classes"], axis=-1), 1, rtol=1e-5)
    logits = class_logits(out["classes"], out["void"], out["scale"], jnp.eye(8)[:3])
    assert logits.shape == (3, 2, 5, 4)
    # a query whose previous mask is empty everywhere still reads the pixels (no NaN from an all-masked softmax)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, -1.0) if "mask_mlp" in jax.tree_util.keystr(path) else x, params
    )
    out = decoder.apply({"params": params}, jnp.abs(grid))
    assert np.isfinite(np.asarray(out["masks"])).all()
    with pytest.raises(ValueError, match="odd"):
        decoder.init(jax.random.key(1), grid[:, :3])


@pytest.mark.slow
def test_tiny_dense_adaptation_trains_and_reports(tiny_export, tmp_path):
    """CI length through the launcher: a random umg_tiny export (32 px) adapted at 16 px (its position table
    resized), PET adapters, 2 devices; the loss falls and every reading reports mIoU and PQ."""
    workdir = str(tmp_path / "seg")
    args = [
        f"--config={ROOT}/configs/umg_tiny_seg.py:init_from={tiny_export('umg_tiny')},pet=true,num_steps=12,"
        "batch_size=8,image_size=16",
        "--config.log_every=4",
        "--config.data.heldout_size=16",
        "--config.eval_batch_size=8",
        "--config.dense.num_queries=8",
        "--config.dense.dim=32",
        "--config.dense.mlp_dim=64",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, f"{ROOT}/launch/tpu.py", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Initialised" in done.stdout and "2 device(s)" in done.stdout
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for reading in ("ensemble", "decoder", "training_free"):
        assert 0 <= results[f"{reading}/miou"] <= 1 and 0 <= results[f"{reading}/pq"] <= 1
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_step_trains_only_the_decoder_and_adapters():
    """One step of PET adaptation (16 px scenes-sized batch: one object and the background an image): the decoder and
    the adapters move, nothing else does."""
    import flax

    from cloc_jax import sharding
    from cloc_jax.config import load_config_file
    from cloc_jax.data.scenes import Scenes
    from cloc_jax.models.mask_decoder import make_decoder
    from cloc_jax.train.dense import abstract_dense_state, example_batch, make_dense_step
    from cloc_jax.train.state import build

    c = load_config_file(f"{ROOT}/configs/umg_tiny_seg.py", "pet=true,batch_size=4,image_size=16")
    c.unlock()
    c.dense.update(num_queries=8, dim=16, mlp_dim=32, layers=1)
    c.optim.warmup_steps = 0
    _, model, tx = build(c)
    decoder = make_decoder(c.dense, model)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    batch = jax.tree.map(np.array, example_batch(c, 4))
    batch["image"] = np.random.default_rng(0).uniform(-1, 1, batch["image"].shape).astype(np.float32)
    batch["region_masks"][:, 0, 2:9, 3:12] = True
    batch["region_labels"][:, 0], batch["region_mask"][:, 0] = 7, True
    batch["semantic"] = np.where(batch["region_masks"][:, 0], 7, 40).astype(np.int32)  # 40: background
    batch["has_masks"][:], batch["has_semantic"][:] = True, True
    spec = TargetSpec.of(c, Scenes.segmentation_classes)
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(c.axis_rules):
        init, _ = abstract_dense_state(c, model, decoder, tx, mesh)
        state = init(jax.random.key(0))
        text = np.eye(model.spec.embed_dim, dtype=np.float32)[:40]
        new, metrics = jax.jit(make_dense_step(c, model, decoder, tx, text, spec))(
            state, sharding.global_batch(batch, mesh)
        )
    assert np.isfinite(float(metrics["loss"])) and float(metrics["targets_per_image"]) == 2
    before = flax.traverse_util.flatten_dict(state.params, sep="/")
    after = flax.traverse_util.flatten_dict(new.params, sep="/")
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith("decoder/") or "adapter" in k for k in moved)
    assert any("adapter" in k for k in moved) and any(k.startswith("decoder/") for k in moved)


def test_the_dense_step_compiles_ahead_of_time_for_a_tpu_topology():
    """The AOT path the paper-scale config takes (`umg_l14_seg` on v5p:2x2x2: 33.9 GiB a chip, 9 minutes of compile
    here), at tiny scale: PET, 4 v5p chips, data parallel; memory reported, FLOPs not counted."""
    from cloc_jax.config import load_config_file
    from cloc_jax.train import aot

    c = load_config_file(f"{ROOT}/configs/umg_tiny_seg.py", "pet=true,batch_size=8,image_size=32")
    c.unlock()
    c.dense.update(num_queries=8, dim=16, mlp_dim=32, layers=1, num_classes=41)
    c.tokenizer.update(context_length=24, region_context_length=24)
    report = aot.compile_for(c, aot.topology_devices("v5p:2x2x1"))
    assert report["devices"] == 4 and report["fits"] and 0 < report["per_device_gib"] < 1
    assert "FLOPs" not in aot.format_report("v5p", report)
    c.dense.num_classes = 0
    with pytest.raises(ValueError, match=r"dense\.num_classes"):
        aot.compile_for(c, aot.topology_devices("v5p:2x2x1"))
