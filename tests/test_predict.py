"""`python -m cloc_jax.predict`: box parsing, the model's geometry, the numbers against the plain Encoder,
and bad input as one line (tiny random models: the tests compare paths, not quality)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cloc_jax import load
from cloc_jax.data import preprocess, transforms
from cloc_jax.data.scenes import Scenes
from cloc_jax.models.spec import PreprocessSpec
from cloc_jax.predict import parse_boxes, parse_labels, parse_templates, predict
from tests.conftest import ROOT


@pytest.fixture
def exports(tiny_export):
    return {name: tiny_export(name) for name in ("cloc_tiny", "clip_tiny")}


@pytest.fixture(scope="module")
def image():
    return Scenes("heldout", size=2, image_size=60)[1]["image"][:, :48]  # 60 x 48: not square


def test_boxes_in_pixels_or_normalised_and_bad_boxes_are_one_line(tmp_path):
    np.testing.assert_allclose(parse_boxes("10,20,30,40", 50, 100), [[0.1, 0.4, 0.3, 0.8]])
    np.testing.assert_allclose(parse_boxes("0.1,0.2,0.3,0.4; 0,0,1,1", 50, 100), [[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]])
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"boxes": [[10, 20, 30, 40]]}))
    np.testing.assert_allclose(parse_boxes(str(path), 50, 100), [[0.1, 0.4, 0.3, 0.8]])
    with pytest.raises(ValueError, match=r"box 0 \(10, 20, 130, 40\) lies outside the 100x50 image"):
        parse_boxes("10,20,130,40", 50, 100)
    with pytest.raises(ValueError, match=r"box 1 \(0.5, 0.5, 0.2, 0.9\) is not x0 < x1"):
        parse_boxes("0,0,1,1;0.5,0.5,0.2,0.9", 50, 100)
    with pytest.raises(ValueError, match="expected x0,y0,x1,y1"):
        parse_boxes("1,2,3", 50, 100)
    assert parse_labels("cat, dog,,car") == ["cat", "dog", "car"]
    assert parse_templates([]) == ("{}",) and parse_templates(["a {}.", "the {}"]) == ("a {}.", "the {}")
    with pytest.raises(ValueError, match=r"--template='a photo' has no \{\} where the label goes"):
        parse_templates(["a photo"])


def test_labels_with_templates_are_prompt_ensembles(exports):
    encoder = load(exports["cloc_tiny"])
    z = encoder.encode_text(["large red circle", "small red circle", "large blue square", "small blue square"])
    mean = z.astype(np.float64).reshape(2, 2, -1).mean(1)
    expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    got = encoder.encode_classes(["red circle", "blue square"], ("large {}", "small {}"))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_letterbox_geometry_is_the_training_resize_pad_and_inverts():
    _, geometry = preprocess.model_input(np.zeros((60, 48, 3), np.uint8), PreprocessSpec(), 32)
    boxes = np.array([[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1]], np.float32)
    _, expected = transforms.resize_pad(np.zeros((60, 48, 3), np.uint8), boxes, 32)
    np.testing.assert_allclose(geometry.to_model(boxes), expected, atol=1e-6)
    np.testing.assert_allclose(geometry.to_image(geometry.to_model(boxes)), boxes, atol=1e-6)


def _model_input(encoder, image):
    pixels, _ = transforms.resize_pad(image, np.zeros((0, 4), np.float32), encoder.image_size)
    return pixels[None].astype(np.float32) / 127.5 - 1


def _geometry(encoder, image):
    return preprocess.model_input(image, encoder.spec.preprocess, encoder.image_size)[1]


def test_predictions_are_the_encoders_numbers(exports, image):
    encoder = load(exports["cloc_tiny"])
    labels = ["red circle", "blue square", "green star"]
    boxes = np.array([[0.1, 0.1, 0.6, 0.5], [0.3, 0.4, 0.9, 0.95]], np.float32)
    result = predict(encoder, image, labels, boxes, ["the red circle"], top_k=2, heatmap=True)
    x = _model_input(encoder, image)
    logits = encoder.logits(x, labels)[0]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()  # CLIP: softmax over the labels
    assert [r["label"] for r in result["image"]] == [labels[i] for i in np.argsort(-p)[:2]]
    assert result["image"][0]["score"] == pytest.approx(p.max(), rel=1e-5)
    scale, _ = encoder.logit_params()
    regions = encoder.encode_regions(x, _geometry(encoder, image).to_model(boxes)[None])[0]
    q = np.exp(scale * regions @ encoder.encode_text(labels).T)
    q /= q.sum(1, keepdims=True)
    for item, row in zip(result["boxes"], q):
        assert item["labels"][0] == dict(label=labels[int(row.argmax())], score=pytest.approx(row.max(), rel=1e-5))
    grounded = _geometry(encoder, image).to_image(encoder.ground(x, [["the red circle"]])[0])
    np.testing.assert_allclose(result["ground"][0]["box"], grounded[0], atol=1e-6)
    assert result["heatmaps"]["the red circle"].shape == (16, 16) and not result["notes"]


def test_segment_labels_each_pixel_with_its_nearest_label_by_the_dense_outputs(exports, image):
    """60 x 48 letterboxed into 32 px: pixel (y, x) of the image lies at input ((x + 0.5) * 32 / 60, ...); its class
    is the argmax of the token grid's cosines interpolated there (scipy), and the shares add up to one."""
    from scipy import ndimage

    encoder = load(exports["clip_tiny"])
    labels = ["red circle", "blue square", "background"]
    result = predict(encoder, image, segment=labels)
    x = _model_input(encoder, image)
    cosines = (encoder.dense(x)[0] @ encoder.encode_classes(labels).T).astype(np.float64)  # [4, 4, 3]
    scale = 32 / 60
    ys, xs = [((np.arange(n) + 0.5) * scale) / 8 - 0.5 for n in (60, 48)]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    up = np.stack([ndimage.map_coordinates(cosines[..., c], [yy, xx], order=1, mode="nearest") for c in range(3)])
    np.testing.assert_array_equal(result["classes"], up.argmax(0))
    assert sum(result["segments"].values()) == pytest.approx(1.0)
    assert result["segments"]["background"] == pytest.approx(np.mean(up.argmax(0) == 2))


def test_a_clip_only_model_pools_boxes_and_says_it_cannot_ground(exports, image):
    result = predict(load(exports["clip_tiny"]), image, ["a", "b"], np.array([[0, 0, 0.5, 0.5]]), ["the a"])
    assert len(result["boxes"]) == 1 and not result["ground"]
    assert any("cannot ground" in note for note in result["notes"])


PREDICT = [sys.executable, "-m", "cloc_jax.predict"]


def _cli(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([*PREDICT, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_the_command_prints_draws_and_writes_json(exports, image, tmp_path):
    Image.fromarray(image).save(tmp_path / "scene.png")
    out, js = tmp_path / "drawn.png", tmp_path / "out.json"
    run = _cli(
        f"--model={exports['cloc_tiny']}",
        f"--image={tmp_path / 'scene.png'}",
        "--labels=red circle,blue square",
        "--boxes=5,5,30,40",
        "--ground=the red circle",
        f"--out={out}",
        "--heatmap",
        f"--json={js}",
        "--segment=red circle,blue square,background",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("image: ") and "box 0 [" in run.stdout and "'the red circle' -> [" in run.stdout
    assert Image.open(out).size == (48, 60)
    result = json.loads(js.read_text())
    assert len(result["boxes"][0]["box"]) == 4 and len(result["ground"]) == 1
    assert np.asarray(result["heatmaps"]["the red circle"]).shape == (16, 16)
    assert set(result["segments"]) == {"red circle", "blue square", "background"} and "classes" not in result
    covering = sorted(((k, v) for k, v in result["segments"].items() if v > 0), key=lambda kv: -kv[1])
    assert "segments: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in covering) in run.stdout  # covering labels only


@pytest.mark.parametrize(
    "args,says",
    [
        (["--image=/nonexistent.png"], "error: --image=/nonexistent.png: no such file"),
        (["--boxes=5,5,300,40", "--labels=a"], "error: --boxes: box 0 (5, 5, 300, 40) lies outside the 48x60 image"),
        (["--model=/nonexistent/model"], "error: '/nonexistent/model' is no known checkpoint"),
    ],
)
def test_bad_input_is_one_line(exports, image, tmp_path, args, says):
    Image.fromarray(image).save(tmp_path / "scene.png")
    defaults = {"--model": f"--model={exports['cloc_tiny']}", "--image": f"--image={tmp_path / 'scene.png'}"}
    given = {a.split("=")[0] for a in args}
    run = _cli(*[v for k, v in defaults.items() if k not in given], *args)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert says in run.stderr
