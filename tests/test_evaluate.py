"""Evaluation on device over a mesh against the plain single-device Encoder, and `python -m cloc_jax.evaluate`
end to end: the embedded scenes, tfds mock data of imagenet2012 / ref_coco / lvis, Karpathy's COCO layout,
and two processes against one. Meshes: the 8 simulated devices, data-parallel."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cloc_jax import load, sharding
from cloc_jax.boxes import cell_boxes
from cloc_jax.config import base_config
from cloc_jax.data import pipeline, preprocess, sources
from cloc_jax.data.segmentation import LAYOUTS
from cloc_jax.evals import eval_config
from cloc_jax.evals.regions import crop_and_resize
from cloc_jax.evals.runner import OUTPUTS, EvalRunner
from tests.conftest import ROOT


@pytest.fixture
def exports(tiny_export):
    return {name: tiny_export(name) for name in ("cloc_tiny", "clip_tiny", "umg_tiny")}


def _scenes_batch(encoder, n=16):
    config = eval_config(encoder.spec, n, 2)
    source = sources.from_spec("scenes:heldout:16", encoder.image_size)
    return next(pipeline.eval_batches(config, source, encoder.tokenizer, n, max_regions=4, max_captions=2)[1])


@pytest.mark.parametrize("name", ["cloc_tiny", "clip_tiny", "umg_tiny"])
def test_device_outputs_over_8_devices_equal_the_single_device_encoder(exports, name):
    encoder = load(exports[name])
    batch = _scenes_batch(encoder)
    device = EvalRunner(encoder, sharding.make_mesh(base_config().mesh), 16)
    assert len(device.mesh.devices.flat) == 8
    needs = set(OUTPUTS) - (set() if encoder.can_ground else {"ground"})
    out = device.outputs(batch, frozenset(needs))
    np.testing.assert_allclose(out["image"], encoder.encode_image(batch["image"]), atol=2e-5)
    np.testing.assert_allclose(out["regions"], encoder.encode_regions(batch["image"], batch["boxes"]), atol=2e-5)
    if "ground" in needs:
        expected = encoder.ground(batch["image"], batch["ground_tokens"])
        np.testing.assert_allclose(out["ground"], expected, atol=2e-5)
    size = batch["image"].shape[1]
    crops = np.stack([crop_and_resize(batch["image"][3], box, size) for box in batch["boxes"][3]])
    np.testing.assert_allclose(out["crops"][3], encoder.encode_image(crops)[:4], atol=2e-5)
    gathered = device.gather(batch)
    assert "image" not in gathered and (gathered["index"] == batch["index"]).all()
    # dense outputs: the region head's embedding of every token's cell (4 x 4 tokens of 8 px on 32 px inputs)
    cells = np.broadcast_to(cell_boxes(4, 4), (16, 16, 4))
    expected = encoder.encode_regions(batch["image"], cells).reshape(16, 4, 4, -1)
    np.testing.assert_allclose(out["dense"], expected, atol=2e-5)
    np.testing.assert_allclose(encoder.dense(batch["image"][:2]), expected[:2], atol=2e-5)
    up = encoder.dense(batch["image"][:2], pixels=True)
    assert up.shape == (2, 32, 32, expected.shape[-1])
    np.testing.assert_allclose(np.linalg.norm(up, axis=-1), 1, atol=1e-5)
    # pixel 12's centre lies 1/16 of a cell past cell 1's centre in both directions: bilinear, then renormalised
    w = np.array([15 / 16, 1 / 16])
    mix = np.einsum("i,j,bijd->bd", w, w, expected[:2, 1:3, 1:3].astype(np.float64))
    np.testing.assert_allclose(up[:, 12, 12], mix / np.linalg.norm(mix, axis=-1, keepdims=True), atol=2e-5)


def test_texts_are_encoded_in_chunks_across_devices_and_class_prompts_once(exports, monkeypatch):
    encoder = load(exports["cloc_tiny"])
    device = EvalRunner(encoder, sharding.make_mesh(base_config().mesh), 8)
    texts = [f"{s} red circle" for s in ("large", "small", "a", "the")] * 5  # 20: not a multiple of 8
    np.testing.assert_allclose(device.encode(texts), encoder.encode_text(texts), atol=2e-5)
    assert device.encode([]).shape == (0, encoder.encode_text(texts).shape[1])
    names, templates = ["red circle", "blue square"], ("large {}", "small {}")
    z = encoder.encode_text([t.format(n) for n in names for t in templates]).reshape(2, 2, -1).mean(1)
    np.testing.assert_allclose(
        device.classes(names, templates), z / np.linalg.norm(z, axis=1, keepdims=True), atol=2e-5
    )
    monkeypatch.setattr(device, "encode", lambda texts: pytest.fail("class prompts encoded twice"))
    device.classes(names, templates)
    monkeypatch.undo()
    device.set_params(encoder.params)  # new parameters: the prompts must be encoded again
    monkeypatch.setattr(device, "encode", lambda texts: pytest.fail("re-encoded, as it must be"))
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        device.classes(names, templates)


EVALUATE = [sys.executable, "-m", "cloc_jax.evaluate"]


def _cli(*args, env=None, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **(env or {})}
    return subprocess.run([*EVALUATE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _run_main(*argv):
    """`python -m cloc_jax.evaluate ARGV` in this process (tfds mock data patches this process only)."""
    from absl import flags

    from cloc_jax import evaluate

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", *argv])
    try:
        evaluate.main(["evaluate"])
    finally:
        flags.FLAGS.unparse_flags()


def _records(path):
    with open(path) as f:
        out = json.load(f)
    return {(r["benchmark"], r["metric"]): r for r in out["records"]}, {s["benchmark"]: s for s in out["skipped"]}


def test_imagenet_through_tfds_mock_data_against_a_numpy_reference(exports, tmp_path, capsys):
    import tensorflow_datasets as tfds

    out = tmp_path / "imagenet.json"
    with tfds.testing.mock_data(num_examples=24):
        _run_main(f"--model={exports['cloc_tiny']}", "--suite=imagenet", "--batch_size=16", f"--out={out}")
        source = sources.from_spec("tfds:imagenet2012:validation", 32)
        images = [source[i] for i in range(len(source))]
    records, skipped = _records(out)
    assert not skipped and {b for b, _ in records} == {
        "imagenet",
        "imagenet_v2",
        "imagenet_a",
        "imagenet_r",
        "imagenet_sketch",
    }
    top1 = records["imagenet", "top1"]
    assert top1["images"] == 24 and top1["skipped_images"] == 0
    assert top1["protocol"] == dict(
        type="zeroshot", templates=80, classes="imagenet", present_only=False, geometry="letterbox 32 (bicubic)"
    )  # the export's spec: a model trained here records CLOC's letterbox
    assert records["imagenet_a", "top1"]["protocol"]["present_only"] is True
    # The reference: the single-device encoder, the 1,000 names x 80 templates, NumPy argsort.
    encoder = load(exports["cloc_tiny"])
    with open(os.path.join(ROOT, "cloc_jax", "evals", "imagenet.json")) as f:
        meta = json.load(f)
    prompts = [t.format(c) for c in meta["classes"] for t in meta["templates_openai"]]
    z = np.concatenate([encoder.encode_text(prompts[i : i + 4000]) for i in range(0, len(prompts), 4000)])
    z = z.reshape(1000, 80, -1).mean(1)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    prep = pipeline.Preprocess(encoder.tokenizer, eval_config(encoder.spec, 16, 1).tokenizer, 32, 4)
    rows = [prep.map(r) for r in images]
    scores = encoder.encode_image(np.stack([r["image"] for r in rows])) @ z.T
    labels = np.array([r["label"] for r in rows])
    ranked = np.argsort(-scores, axis=1, kind="stable")
    assert top1["value"] == pytest.approx(np.mean(ranked[:, 0] == labels))
    assert records["imagenet", "top5"]["value"] == pytest.approx(np.mean((ranked[:, :5] == labels[:, None]).any(1)))
    assert "CLOC Table 2" not in capsys.readouterr().out  # the paper's columns come with --suite=paper only


def test_refcoco_and_lvis_through_tfds_mock_data(exports, tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "refcoco.json"
    with tfds.testing.mock_data(num_examples=6):
        _run_main(f"--model={exports['cloc_tiny']}", "--suite=refcoco", "--batch_size=16", f"--out={out}")
        source = sources.from_spec("tfds:ref_coco/refcoco_unc:testA", 32)
        expressions = sum(len(e) for i in range(len(source)) for e in source[i]["referring"] if e)
    records, skipped = _records(out)
    assert not skipped and len({b for b, _ in records}) == 8  # RefCOCO, RefCOCO+ val/testA/testB; g val/test
    assert 0 <= records["refcoco_testA", "acc50"]["value"] <= 1 and expressions > 0
    # tfds mock data gives each image hundreds of expressions, over the cap of 32: counted, not hidden
    stats = records["refcoco_testA", "acc50"]["data_stats"]
    assert stats["data/dropped/expressions_over_eval_max"] > 0
    out = tmp_path / "lvis.json"
    with tfds.testing.mock_data(num_examples=6):
        _run_main(f"--model={exports['clip_tiny']}", "--suite=regions", "--batch_size=16", f"--out={out}")
    records, skipped = _records(out)
    assert records["lvis_regions", "macc"]["protocol"] == dict(
        type="region_classification", templates=1, classes="the data's own", geometry="letterbox 32 (bicubic)"
    )
    assert skipped["coco_regions"]["reason"].startswith("no data: pass --data.coco_regions=coco:")
    assert skipped["grit_regions"]["reason"].startswith("no data: pass --data.grit_regions=coco:")


def test_the_paper_suite_on_a_karpathy_layout_fixture_end_to_end(exports, tmp_path):
    from tests.data import fixtures

    recs = fixtures.scene_records(10, image_size=40, split="heldout")
    spec = fixtures.write_karpathy(str(tmp_path / "karpathy"), recs, test=range(10))
    out = tmp_path / "paper.json"
    env = {"TFDS_DATA_DIR": str(tmp_path / "no_tfds")}  # nothing prepared: tfds benchmarks are skipped
    run = _cli(
        f"--model={exports['cloc_tiny']}", f"--data.coco_retrieval={spec}", "--batch_size=8", f"--out={out}", env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    records, skipped = _records(out)
    assert {b for b, _ in records} == {"coco_retrieval"}
    assert set(skipped) == {"imagenet", "grit_regions", "coco_regions", "lvis_regions"}
    assert "tfds build imagenet2012" in skipped["imagenet"]["reason"]
    assert "CLOC Table 2 columns" in run.stdout and "coco_retrieval" in run.stdout
    assert "it/s" in run.stderr or "s/it" in run.stderr  # the progress bar
    # The reference: the single-device encoder, every one of the 5 captions of each image, loops in float64.
    encoder = load(exports["cloc_tiny"])
    prep = pipeline.Preprocess(encoder.tokenizer, eval_config(encoder.spec, 8, 1).tokenizer, 32, 4)
    images = encoder.encode_image(np.stack([prep.map(dict(r, captions=["x"]))["image"] for r in recs])).astype(float)
    texts = encoder.encode_text([c for r in recs for c in fixtures.five_captions(r)]).astype(float)
    owner = np.repeat(np.arange(10), 5)
    sim = images @ texts.T
    i2t = [sum(s > sim[i, owner == i].max() for s in sim[i, owner != i]) < 1 for i in range(10)]
    t2i = [sum(sim[j, t] >= sim[owner[t], t] for j in range(10) if j != owner[t]) < 1 for t in range(50)]
    assert records["coco_retrieval", "i2t_r1"]["value"] == pytest.approx(np.mean(i2t))
    assert records["coco_retrieval", "t2i_r1"]["value"] == pytest.approx(np.mean(t2i))
    assert records["coco_retrieval", "t2i_r10"]["value"] == 1.0  # 10 images: every one is in the top 10
    record = records["coco_retrieval", "t2i_r5"]
    assert record["images"] == 10 and record["data"] == spec and record["model"] == exports["cloc_tiny"]


@pytest.mark.parametrize(
    "args,says",
    [
        (["--model=/nonexistent/model"], "error: '/nonexistent/model' is no known checkpoint"),
        (["--data.imagenet=nope:1"], "error: data source 'nope:1': unknown kind 'nope'"),
        (["--data.imagenet=karpathy:/missing.json:test@/x", "--suite=imagenet"], "error: no benchmark of suite"),
    ],
)
def test_bad_input_is_one_line(exports, args, says):
    model = [] if any(a.startswith("--model") for a in args) else [f"--model={exports['cloc_tiny']}"]
    run = _cli(*model, "--batch_size=8", *args, env={"TFDS_DATA_DIR": "/nonexistent"}, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert says in run.stderr + run.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCENES = [
    f"--data.scenes_{b}=scenes:heldout:40"
    for b in ("retrieval", "zeroshot", "regions", "region_crop", "region_retrieval", "grounding", "segmentation")
]


def _seg_data(root) -> list[str]:
    """--data flags of the seg suite: every semantic benchmark's layout and a COCO panoptic set, 5 scenes each."""
    from tests.data import segmentation_fixtures as fixtures

    recs = fixtures.scenes(5)
    flags = [f"--data.{b}={fixtures.write_semseg(str(root / b), b, recs)}" for b in LAYOUTS]
    return [*flags, f"--data.coco_panoptic={fixtures.write_panoptic(str(root / 'panoptic'), recs)}"]


def _sliding_reference(encoder, images: np.ndarray, window: int) -> np.ndarray:
    """Dense embeddings of every window (stride half a window) averaged per token where they overlap, renormalised."""
    side, stride, patch = images.shape[1], window // 2, 8
    total = np.zeros((len(images), side // patch, side // patch, encoder.encode_text(["x"]).shape[-1]))
    count = np.zeros((side // patch, side // patch, 1))
    for y in range(0, side - window + 1, stride):
        for x in range(0, side - window + 1, stride):
            dense = encoder.dense(images[:, y : y + window, x : x + window])
            total[:, y // patch : (y + window) // patch, x // patch : (x + window) // patch] += dense
            count[y // patch : (y + window) // patch, x // patch : (x + window) // patch] += 1
    mean = total / count
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


@pytest.mark.parametrize("size,slide", [(0, 0), (48, 0), (0, 3)])
def test_semantic_segmentation_against_the_single_device_encoder_and_scipy(exports, tmp_path, size, slide):
    """ADE20K-150's layout: mIoU from `evaluate` equals the single-device Encoder's dense embeddings, cosines bilinear
    at each label pixel (scipy), per-class counting in float64; at the model's 32 px, at 48 (`--seg_size`), and by
    3 x 3 sliding windows of 32 px over a 64 px canvas (`--seg_slide`)."""
    from scipy import ndimage

    from tests.data import segmentation_fixtures as fixtures

    recs = fixtures.scenes(6)
    spec = fixtures.write_semseg(str(tmp_path / "ade"), "ade150", recs)
    from cloc_jax import evaluate

    found, _ = evaluate.run(exports["umg_tiny"], "ade150", dict(ade150=spec), 8, 1, "bare", size, slide)
    records = {(r["benchmark"], r["metric"]): r for r in found}
    encoder, source = load(exports["umg_tiny"]), sources.from_spec(spec, 32)
    names, side = source.class_names, size or (64 if slide else 32)
    files = [os.path.join(source.image_dir, f"img_{i:05d}.jpg") for i in range(6)]
    decoded = [preprocess.decode(pathlib.Path(f).read_bytes()) for f in files]
    images = np.stack([preprocess.model_input(d, encoder.spec.preprocess, side)[0] for d in decoded]) / 127.5 - 1
    dense = _sliding_reference(encoder, images, 32) if slide else encoder.dense(images)
    cosines = dense @ encoder.encode_classes(names).T  # [6, side / 8, side / 8, 150]
    position = ((np.arange(40) + 0.5) * side / 40) / 8 - 0.5  # letterbox 40 -> side; 8 px cells
    yy, xx = np.meshgrid(position, position, indexing="ij")
    hits, union = np.zeros(150), np.zeros(150)
    for grid, r in zip(cosines.astype(np.float64), recs):
        labels = fixtures.benchmark_labels(r["semantic"], 150)
        up = np.stack([ndimage.map_coordinates(grid[..., c], [yy, xx], order=1, mode="nearest") for c in range(150)])
        predicted, scored = up.argmax(0), labels >= 0
        for c in range(150):
            hits[c] += np.sum((predicted == c) & (labels == c) & scored)
            union[c] += np.sum(((predicted == c) | (labels == c)) & scored)
    assert records["ade150", "miou"]["value"] == pytest.approx(np.mean(hits[union > 0] / union[union > 0]), abs=1e-9)
    windows = ", sliding windows of 32 at stride 16" if slide else ""
    assert records["ade150", "miou"]["protocol"]["geometry"] == f"letterbox {side} (bicubic){windows}"


def test_label_maps_out_of_range_are_counted_and_the_benchmark_says_why(exports, tmp_path):
    from PIL import Image

    from cloc_jax import evaluate
    from tests.data import segmentation_fixtures as fixtures

    spec = fixtures.write_semseg(str(tmp_path / "voc"), "voc", fixtures.scenes(2))
    labels = tmp_path / "voc" / "annotations_detectron2" / "val"
    for path in labels.iterdir():  # class 40 of VOC's 20
        Image.fromarray(np.full((40, 40), 40, np.uint8)).save(path)
    records, skipped = evaluate.run(exports["clip_tiny"], "voc", dict(voc=spec), 8, 1, templates="bare")
    assert not records and skipped == [
        dict(benchmark="voc", reason="nothing to score in 2 images (dropped/semantic_class_out_of_range: 2)")
    ]
    with pytest.raises(ValueError, match="exclude each other"):
        evaluate.run(exports["clip_tiny"], "voc", dict(voc=spec), 8, 1, seg_size=64, seg_slide=3)


def test_two_processes_give_the_one_process_metrics(exports, tmp_path):
    """The scenes suite (every evaluator) and the seg suite on fixtures of every benchmark's layout, on 1 process x 4
    devices and on 2 processes x 2 devices: the same batch of 16 per step, 4 rows per device, so the numbers must
    agree (segmentation sums each host's confusion matrix)."""
    seg = _seg_data(tmp_path)
    args = [
        f"--model={exports['cloc_tiny']}",
        "--suite=scenes,seg",
        "--templates=bare",
        "--batch_size=16",
        *SCENES,
        *seg,
    ]
    one = _cli(*args, f"--out={tmp_path / 'one.json'}", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-2000:]
    port, procs = _free_port(), []
    clean = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # see test_faults
    for pid in range(2):
        env = {
            **clean,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [*EVALUATE, *args, f"--out={tmp_path / f'two_{pid}.json'}"]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert not (tmp_path / "two_1.json").exists()  # process 0 writes the results
    expected, skipped = _records(tmp_path / "one.json")
    got, _ = _records(tmp_path / "two_0.json")
    assert set(got) == set(expected) and len({b for b, _ in got}) == 7 + 6  # the scenes suite, 6 semantic sets
    assert "panoptic output" in skipped["coco_panoptic"]["reason"] and "no data" in skipped["ade_panoptic"]["reason"]
    for key in expected:
        assert got[key]["value"] == pytest.approx(expected[key]["value"], abs=1e-6), key


def test_training_runs_benchmark_entries_beside_its_heldout_ones(exports):
    """`config.evals` with a benchmark entry on its own data and the held-out split's entries: one pass
    each, the benchmark's metrics under its name."""
    from cloc_jax import evals
    from cloc_jax.evals import benchmarks
    from tests.conftest import tiny_config

    config = tiny_config()
    with config.unlocked():
        config.evals = dict(
            zeroshot=config.evals.zeroshot.to_dict(),
            imagenet=dict(benchmarks.BENCHMARKS["scenes_zeroshot"], data="scenes:heldout:16", prefix="scenes"),
        )
    encoder = load(exports["cloc_tiny"])
    device = evals.runner_for(config, encoder, sharding.make_mesh(config.mesh))
    results = evals.run_all(config, device)
    assert set(results) == {"zeroshot/top1", "zeroshot/top5", "scenes/top1", "scenes/top5"}
    assert all(0 <= v <= 1 for v in results.values())
