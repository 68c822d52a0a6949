"""`python -m cloc_jax.embed`: the shards hold the Encoder's embeddings with their record ids, and a run
killed mid-way then rerun leaves the files an uninterrupted run writes (a tiny random model)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cloc_jax import load
from cloc_jax.data import pipeline, sources
from cloc_jax.embed import embed
from cloc_jax.evals import eval_config
from tests.conftest import ROOT

DATA = "scenes:heldout:60"


@pytest.fixture
def model(tiny_export):
    return tiny_export("cloc_tiny")


def _files(directory) -> dict:
    return {
        name: dict(np.load(os.path.join(directory, name)))
        for name in sorted(os.listdir(directory))
        if name.endswith(".npz")
    }


def test_shards_hold_the_encoders_embeddings_with_record_ids(model, tmp_path):
    embed(model, DATA, str(tmp_path), shard_size=25, batch_size=8)
    files = _files(tmp_path)
    assert sorted(files) == [f"{w}-p000-{k:05d}.npz" for w in ("images", "regions", "texts") for k in range(3)]
    images = {
        k: np.concatenate([files[f"images-p000-{s:05d}.npz"][k] for s in range(3)]) for k in ("ids", "embeddings")
    }
    np.testing.assert_array_equal(images["ids"], np.arange(60))
    encoder = load(model)
    source = sources.from_spec(DATA, encoder.image_size)
    prep = pipeline.Preprocess(encoder.tokenizer, eval_config(encoder.spec, 8, 1).tokenizer, encoder.image_size, 100)
    rows = [prep.map(source[i]) for i in (0, 31, 59)]
    np.testing.assert_allclose(
        images["embeddings"][[0, 31, 59]], encoder.encode_image(np.stack([r["image"] for r in rows])), atol=2e-5
    )
    regions = files["regions-p000-00001.npz"]  # records 25..49
    first = regions["ids"] == 31
    expected = encoder.encode_regions(rows[1]["image"][None], rows[1]["boxes"][None])[0][rows[1]["region_mask"]]
    np.testing.assert_allclose(regions["embeddings"][first], expected, atol=2e-5)
    np.testing.assert_array_equal(regions["region"][first], np.arange(first.sum()))
    texts = files["texts-p000-00000.npz"]
    np.testing.assert_allclose(
        texts["embeddings"][texts["ids"] == 0], encoder.encode_text(source[0]["captions"]), atol=2e-5
    )


def test_dense_features_are_the_encoders_with_their_geometry(model, tmp_path):
    embed(model, "scenes:heldout:12", str(tmp_path), what=("dense",), shard_size=12, batch_size=8)
    dense = np.load(tmp_path / "dense-p000-00000.npz")
    encoder = load(model)
    source = sources.from_spec("scenes:heldout:12", encoder.image_size)
    prep = pipeline.Preprocess(encoder.tokenizer, eval_config(encoder.spec, 8, 1).tokenizer, encoder.image_size, 4)
    images = np.stack([prep.map(source[i])["image"] for i in (0, 11)])
    np.testing.assert_array_equal(dense["ids"], np.arange(12))
    assert dense["embeddings"].dtype == np.float16 and dense["embeddings"].shape[1:3] == (4, 4)  # 32 px, 8 px patches
    np.testing.assert_allclose(dense["embeddings"][[0, 11]], encoder.dense(images), atol=2e-3)  # float16
    np.testing.assert_allclose(dense["geometry"][0], [1, 1, 0, 0])  # scenes rendered at the model's 32 px


def test_killed_then_rerun_gives_the_uninterrupted_files(model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "cloc_jax.embed",
        f"--model={model}",
        f"--data={DATA}",
        "--shard_size=10",
        "--batch_size=8",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # the same devices both times
    run = subprocess.run([*cmd, f"--out={straight}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cmd.append(f"--out={killed}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "texts-p000-00000.npz").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _files(killed)
    assert all(not name.endswith(".partial.npz") for name in done)  # only whole shards carry a final name
    for name in list(done)[:2]:  # and a shard lost with its temporary file: both are made again
        os.remove(killed / name)
    (killed / "images-p000-00005.partial.npz").write_bytes(b"half a file")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got, want = _files(killed), _files(straight)
    assert sorted(n for n in got if not n.endswith(".partial.npz")) == sorted(want)
    for name in want:
        for key in want[name]:
            np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{name} {key}")


def test_bad_input_is_one_line(model, tmp_path):
    cmd = [sys.executable, "-m", "cloc_jax.embed", f"--model={model}", f"--out={tmp_path}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for args, says in (
        (["--data=nope:1"], "error: data source 'nope:1': unknown kind 'nope'"),
        ([f"--data={DATA}", "--what=images,pixels"], "error: --what=images,pixels: choose from images,texts,regions"),
    ):
        run = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "Traceback" not in run.stderr and says in run.stderr, run.stderr[-2000:]
