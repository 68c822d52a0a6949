"""Checkpoint round trips: data iterator continuity, model-spec checks, export -> load."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from cloc_jax import load
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.data.pipeline import train_iterator
from cloc_jax.models.spec import from_config, from_dict, mismatch
from cloc_jax.tokenizers import ByteTokenizer
from cloc_jax.train import train_and_evaluate
from cloc_jax.weights.native import export
from tests.conftest import tiny_config


def test_restored_data_iterator_continues_without_repeating_or_skipping(tmp_path, config):
    tok = ByteTokenizer()
    reference = train_iterator(config, tok)
    expected = [next(reference)["index"] for _ in range(6)]
    it = train_iterator(config, tok)
    seen = [next(it)["index"] for _ in range(3)]
    ckpt = Checkpoints(str(tmp_path), every=1)
    ckpt.save(3, {"w": np.zeros(2)}, it, from_config(config), force=True)
    ckpt.wait()
    fresh = train_iterator(config, tok)
    ckpt.restore(3, {"w": jax.ShapeDtypeStruct((2,), np.float64)}, fresh)
    seen += [next(fresh)["index"] for _ in range(3)]
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)


def test_spec_mismatch_names_the_first_difference():
    a = from_dict(dict(model=dict(image=dict(variant="B/16")), image_size=224))
    b = from_dict(dict(model=dict(image=dict(variant="L/14")), image_size=224))
    assert mismatch(a, a) is None
    assert mismatch(a, b) == "model.image.variant: 'B/16' != 'L/14'"


def test_a_spec_saved_before_an_option_existed_matches_at_the_option_default():
    current = from_config(tiny_config())
    older = current.to_json()
    del older["model"]["image"]["cluster_unfold"]  # a checkpoint written before the option existed
    assert mismatch(from_dict(older), current) is None
    changed = current.replace(**{"model.image.cluster_unfold": "residual"})
    assert mismatch(from_dict(older), changed) == "model.image.cluster_unfold: 'copy' != 'residual'"


def test_a_spec_key_no_version_wrote_is_one_line():
    saved = from_config(tiny_config()).to_json()
    saved["model"]["image"]["cluster_unfolds"] = "copy"  # a typo, or a file from a newer cloc_jax
    with pytest.raises(ValueError, match=r"spec key model\.image\.cluster_unfolds is unknown"):
        from_dict(saved)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step tiny run shared by the tests below, evaluated on what they read (zero-shot and retrieval):
    (config, workdir, final metrics)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(num_steps=6, eval_every=6, log_every=2)
    config.data.heldout_size = 32
    with config.unlocked():
        config.evals = {name: config.evals[name] for name in ("zeroshot", "retrieval")}
    results = train_and_evaluate(config, workdir)
    return config, workdir, results


def test_run_writes_metrics_tensorboard_and_checkpoints(trained):
    _, workdir, results = trained
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "temperature", "images_per_s"} <= set(train_rows[0])
    evals = [r for r in rows if "retrieval/i2t_r1" in r]
    assert evals and evals[-1]["step"] == 6
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1", "zeroshot/top1"):
        assert 0.0 <= evals[-1][key] <= 1.0 and results[key] == evals[-1][key]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert Checkpoints(workdir).latest_step() == 6


def test_workdir_with_a_different_model_is_refused(trained):
    _, workdir, _ = trained
    other = tiny_config(num_steps=8)
    other.model.text.depth = 3
    with pytest.raises(ValueError, match=r"different model \(model.text.depth: 2 != 3\); use a new --workdir"):
        train_and_evaluate(other, workdir)


def test_remat_dtype_and_packing_are_layout_not_identity(trained):
    _, workdir, _ = trained
    other = tiny_config(**{"model.remat": "full", "model.dtype": "bfloat16", "tokenizer.region_pack_length": 48})
    Checkpoints(workdir).check_spec(6, from_config(other))  # resumes: no error


def test_export_then_load_gives_the_trained_model(trained, tmp_path):
    config, workdir, _ = trained
    out = export(workdir, str(tmp_path / "export"))
    model = load(out)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    zi = model.encode_image(images)
    zt = model.encode_text(["a small red circle", "a large blue square"])
    assert zi.shape == zt.shape == (2, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(zt, axis=1), 1.0, rtol=1e-5)
    # The same numbers as the parameters restored straight from the training checkpoint.
    ckpt = Checkpoints(workdir)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model.params)
    params = ckpt.restore_params(6, shapes)
    again = model.model.apply({"params": params}, images, method=type(model.model).encode_image)
    np.testing.assert_allclose(zi, np.asarray(again), atol=1e-6)
    assert not np.allclose(zi[0], zi[1])
    # A training workdir loads as it stands (its newest checkpoint), as `python -m cloc_jax.evaluate` takes it.
    np.testing.assert_allclose(load(workdir).encode_image(images), zi, atol=1e-6)


def test_exported_model_encodes_regions_and_grounds_texts(trained, tmp_path):
    model = load(export(trained[1], str(tmp_path / "export")))
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.4, 0.2, 0.9, 0.8], [0, 0, 1, 1]]] * 2, np.float32)
    regions = model.encode_regions(images, boxes)
    assert regions.shape == (2, 3, trained[0].model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(regions, axis=-1), 1.0, rtol=1e-5)
    # One image forward serves all prompts: a subset of boxes gives the same embeddings.
    np.testing.assert_allclose(model.encode_regions(images, boxes[:, 1:2])[:, 0], regions[:, 1], atol=1e-5)
    pred = model.ground(images, [["the red circle", "a blue square"], ["the cross", "a star"]])
    assert pred.shape == (2, 2, 4) and (pred[..., 2:] >= pred[..., :2]).all()


def test_clip_only_model_pools_regions_from_tokens_and_cannot_ground(tmp_path):
    config = tiny_config(num_steps=2, **{"model.region_extractor": "none"})
    config.unlock()
    del config.evals["grounding"]
    train_and_evaluate(config, str(tmp_path / "run"))
    model = load(export(str(tmp_path / "run"), str(tmp_path / "export")))
    images = np.zeros((1, 32, 32, 3), np.float32)
    assert model.encode_regions(images, np.array([[[0, 0, 0.5, 0.5]]], np.float32)).shape == (1, 1, 128)
    with pytest.raises(ValueError, match="ground needs a box head"):
        model.ground(images, [["a red circle"]])


def _largest_file(directory: str) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(np.random.default_rng(0).integers(0, 256, max(64, size // 3), np.uint8).tobytes())


DAMAGE = {
    "truncated data file": lambda step: _truncate(_largest_file(os.path.join(step, "state"))),
    "garbled bytes": lambda step: _garble(_largest_file(os.path.join(step, "state"))),
    "missing metadata": lambda step: os.remove(os.path.join(step, "state", "_METADATA")),
    "cut iterator state": lambda step: _truncate(os.path.join(step, "data", "process_0-of-1.json")),
}


def _restore_newest(config, workdir: str):
    from cloc_jax import sharding
    from cloc_jax.train import abstract_state, build

    tokenizer, model, tx = build(config)
    mesh = sharding.make_mesh(config.mesh)
    data_iter = train_iterator(config, tokenizer)
    with jax.set_mesh(mesh):
        step, state = Checkpoints(workdir).restore_newest(
            abstract_state(config, model, tx, mesh)[1], data_iter, from_config(config)
        )
    return step, state, data_iter


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys, damage):
    config, workdir, _ = trained
    copy_dir = str(tmp_path / "run")
    shutil.copytree(workdir, copy_dir)
    DAMAGE[damage](os.path.join(copy_dir, "checkpoints", "6"))
    step, state, data_iter = _restore_newest(config, copy_dir)
    assert step == 4 and int(state.step) == 4
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    assert os.path.join(copy_dir, "checkpoints", "6") in warning and "unreadable" in warning
    assert len(warning) < 400  # one line with the reason, not a TensorStore spec dump
    # Moved aside for a person to inspect, not deleted; the run's own list no longer has it.
    assert os.path.isdir(os.path.join(copy_dir, "checkpoints_unreadable", "6"))
    assert Checkpoints(copy_dir).manager.all_steps() == [2, 4]
    assert data_iter.get_state()["next_index"] == 4 * config.batch_size  # the data position of step 4
    want = Checkpoints(workdir).restore_params(4, jax.tree.map(lambda x: x, state.params))
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)


def test_no_readable_checkpoint_is_one_line_and_export_skips_a_damaged_one(trained, tmp_path):
    config, workdir, _ = trained
    copy_dir = str(tmp_path / "run")
    shutil.copytree(workdir, copy_dir)
    state = os.path.join(copy_dir, "checkpoints", "6", "state")
    for name in (os.path.join(d, f) for d, _, names in os.walk(state) for f in names):
        _truncate(name)  # every file: the parameters too (export reads only those)
    exported = load(export(copy_dir, str(tmp_path / "export")))  # from step 4, and 6 is left in place
    assert os.path.isdir(os.path.join(copy_dir, "checkpoints", "6"))
    want = load(export(workdir, str(tmp_path / "export_4"), step=4))
    for x, y in zip(jax.tree.leaves(exported.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    DAMAGE["missing metadata"](os.path.join(copy_dir, "checkpoints", "6"))
    for step in (2, 4):
        DAMAGE["missing metadata"](os.path.join(copy_dir, "checkpoints", str(step)))
    with pytest.raises(ValueError, match=r"no readable checkpoint in .* \(tried steps \[6, 4, 2\]"):
        _restore_newest(config, copy_dir)
    assert sorted(os.listdir(os.path.join(copy_dir, "checkpoints"))) == ["2", "4", "6"]  # nothing moved
