"""Point a model at one image: zero-shot labels for the image and for boxes, grounded phrases, pictures.

python -m cloc_jax.predict --model=SRC --image=photo.jpg --labels="cat,dog,car" [--boxes="10,20,200,180;..."]
    [--template="a photo of a {}." ...] [--ground="the dog on the left" --ground="..."] [--top_k=5]
    [--out=drawn.png] [--heatmap] [--json=out.json] [--segment="sky,tree,road,car"]

SRC: anything `cloc_jax.load` takes. Boxes are xyxy, in pixels of the image or normalised to [0, 1], given
inline (`;` between boxes) or as a JSON file (`[[x0, y0, x1, y1], ...]`). Labels are comma-separated or a
file with one per line; with `--template`s each label is their prompt ensemble (CLIP's, as the zero-shot
evaluations use). A CLIP-only model answers box questions by pooling its tokens in each box and says
it cannot ground. Boxes in the output are normalised xyxy of the original image. `--segment` labels every pixel
with the nearest of its labels (training-free, from the dense outputs: `evals/segmentation.py`), drawn over the
picture with `--out`, each label's share of the image in the output.
"""

import json
import os

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw

from cloc_jax.boxes import cell_boxes
from cloc_jax.data import preprocess
from cloc_jax.data.transforms import BadImage
from cloc_jax.evals.segmentation import predict_classes
from cloc_jax.inference import Encoder
from cloc_jax.weights import load

HEATMAP_GRID = 16  # cells per side of the similarity map (each cell's region embedding against the text)
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]  # fmt: skip


def read_image(path: str, alpha: str = "grey") -> np.ndarray:
    """A file -> upright uint8 [H, W, 3] (`data.preprocess.decode`); a missing or unreadable file is one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image={path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return preprocess.decode(data, alpha)
    except BadImage as error:
        raise ValueError(f"--image={path}: not a readable image ({error.reason})") from None


def _inputs(encoder: Encoder, image: np.ndarray, rule) -> tuple[np.ndarray, preprocess.Geometry]:
    pixels, geometry = preprocess.model_input(image, rule, encoder.image_size)
    return pixels[None].astype(np.float32) / 127.5 - 1.0, geometry


def parse_labels(arg: str) -> list[str]:
    """ "a,b,c" or a file with one label per line."""
    if os.path.isfile(arg):
        with open(arg) as f:
            labels = [line.strip() for line in f]
    else:
        labels = [t.strip() for t in arg.split(",")]
    labels = [t for t in labels if t]
    if not labels:
        raise ValueError(f"--labels={arg!r} names no label")
    return labels


def parse_templates(templates: list[str]) -> tuple[str, ...]:
    """--template values -> templates; none given is the bare label."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"--template={t!r} has no {{}} where the label goes")
    return tuple(templates) or ("{}",)


def parse_boxes(arg: str, height: int, width: int) -> np.ndarray:
    """Inline "x0,y0,x1,y1;..." or a JSON file -> [N, 4] normalised to the image. Values all <= 1 are
    taken as normalised, else as pixels. A box that is not finite, is empty or leaves the image is an error."""
    if os.path.isfile(arg):
        with open(arg) as f:
            raw = json.load(f)
        raw = raw["boxes"] if isinstance(raw, dict) else raw
    else:
        raw = [part.split(",") for part in arg.split(";") if part.strip()]
    try:
        boxes = np.asarray(raw, np.float64).reshape(-1, 4)
    except ValueError:
        raise ValueError(f"--boxes={arg!r}: expected x0,y0,x1,y1 per box") from None
    pixels = boxes.max(initial=0) > 1
    size = np.array([width, height, width, height], np.float64) if pixels else np.ones(4)
    for k, box in enumerate(boxes):
        shown = ", ".join(f"{v:g}" for v in box)
        if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"--boxes: box {k} ({shown}) is not x0 < x1, y0 < y1")
        if (box < 0).any() or (box > size).any():
            unit = f"the {width}x{height} image" if pixels else "[0, 1]"
            raise ValueError(f"--boxes: box {k} ({shown}) lies outside {unit}")
    return (boxes / size).astype(np.float32)


def _ranked(probabilities: np.ndarray, labels: list[str], top_k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return [dict(label=labels[i], score=float(probabilities[i])) for i in order]


def probabilities(encoder: Encoder, cosines: np.ndarray) -> np.ndarray:
    """Cosines [..., N] -> what the model's loss makes of them: a softmax over the labels (CLIP), or each
    label's own sigmoid (SigLIP)."""
    scale, bias = encoder.logit_params()
    logits = scale * cosines + bias
    if encoder.spec.model.loss == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def predict(
    encoder: Encoder,
    image: np.ndarray,
    labels=(),
    boxes=None,
    phrases=(),
    top_k: int = 5,
    heatmap: bool = False,
    templates=("{}",),
    segment=(),
) -> dict:
    """image uint8 [H, W, 3]; boxes [N, 4] normalised to it -> {"image": [{label, score}], "boxes": [{box,
    labels}], "ground": [{phrase, box, score}], "heatmaps": {text: [g, g]}, "segments": {label: share of the pixels},
    "classes": int [H, W] (indices into `segment`, with it), "notes": [...]}. Labels are the prompt
    ensembles of `templates`; their scores the model's `probabilities`; a grounded box's score is the cosine
    between its region embedding and the phrase."""
    rule = encoder.spec.preprocess
    regions_rule = preprocess.region_rule(rule)  # regions: every box and pixel kept
    x, geometry = _inputs(encoder, image, regions_rule)
    out = dict(image=[], boxes=[], ground=[], heatmaps={}, notes=[])
    z_labels = encoder.encode_classes(list(labels), templates) if labels else None
    if labels:  # the image as a whole: the model's own preprocessing
        whole = x if regions_rule == rule else _inputs(encoder, image, rule)[0]
        out["image"] = _ranked(probabilities(encoder, encoder.encode_image(whole)[0] @ z_labels.T), list(labels), top_k)
    if boxes is not None and len(boxes):
        regions = encoder.encode_regions(x, geometry.to_model(boxes)[None])[0]
        if not encoder.can_ground:
            out["notes"].append(f"regions by {encoder.model.head.description} of the image tokens (no Prompter)")
        for box, z in zip(boxes, regions):
            ranked = _ranked(probabilities(encoder, z @ z_labels.T), list(labels), top_k) if labels else []
            out["boxes"].append(dict(box=[float(v) for v in box], labels=ranked))
    if phrases and not encoder.can_ground:
        out["notes"].append(
            f"this model cannot ground: its region head ({encoder.model.head.description}) has no box head"
        )
    elif phrases:
        predicted = encoder.ground(x, [list(phrases)])  # [1, P, 4] on the padded square
        z_regions = encoder.encode_regions(x, predicted)[0]
        z_phrases = encoder.encode_text(list(phrases))
        for phrase, box, zr, zp in zip(phrases, geometry.to_image(predicted[0]), z_regions, z_phrases):
            out["ground"].append(dict(phrase=phrase, box=[float(v) for v in box], score=float(zr @ zp)))
    if heatmap:
        out["heatmaps"] = similarity_maps(encoder, x, geometry, list(phrases) or list(labels)[:1])
    if segment:
        cosines = encoder.dense(x)[0] @ encoder.encode_classes(list(segment), templates).T
        classes = predict_classes(cosines, geometry.as_array(), image.shape[:2], encoder.image_size)
        out["classes"] = classes
        out["segments"] = {name: float(np.mean(classes == k)) for k, name in enumerate(segment)}
    return out


def similarity_maps(encoder: Encoder, x: np.ndarray, geometry: preprocess.Geometry, texts: list[str]) -> dict:
    """Each text's cosine with the region embedding of every cell of a HEATMAP_GRID square grid over the
    image -> {text: [g, g]} (rows top to bottom)."""
    g = HEATMAP_GRID
    z = encoder.encode_regions(x, geometry.to_model(cell_boxes(g, g))[None])[0]  # [g * g, E]
    return {t: (z @ zt).reshape(g, g) for t, zt in zip(texts, encoder.encode_text(texts))}


def draw(image: np.ndarray, result: dict) -> Image.Image:
    """The image with boxes, their top label and score, grounded phrases, and the first heatmap laid over."""
    canvas = Image.fromarray(image).convert("RGB")
    h, w = image.shape[:2]
    if result["heatmaps"]:
        grid = next(iter(result["heatmaps"].values()))
        level = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-6)
        alpha = Image.fromarray((level * 160).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        canvas = Image.composite(Image.new("RGB", (w, h), (255, 0, 0)), canvas, alpha)
    if "classes" in result:
        palette = np.array([COLOURS[k % len(COLOURS)] for k in range(len(result["segments"]))], np.uint8)
        canvas = Image.blend(canvas, Image.fromarray(palette[result["classes"]]), 0.5)
    pen = ImageDraw.Draw(canvas)
    for row, (share, name, k) in enumerate(_covering(result)):  # the legend: labels that cover any pixel
        pen.text((4, 4 + 12 * row), f"{name} {100 * share:.0f}%", fill=COLOURS[k % len(COLOURS)])
    size = np.array([w, h, w, h])
    for item in result["boxes"]:
        box = (np.array(item["box"]) * size).tolist()
        pen.rectangle(box, outline=(0, 200, 255), width=2)
        if item["labels"]:
            top = item["labels"][0]
            pen.text((box[0] + 2, box[1] + 2), f"{top['label']} {top['score']:.2f}", fill=(0, 200, 255))
    for item in result["ground"]:
        box = (np.array(item["box"]) * size).tolist()
        pen.rectangle(box, outline=(255, 220, 0), width=2)
        pen.text((box[0] + 2, max(0, box[3] - 12)), f"{item['phrase']} {item['score']:.2f}", fill=(255, 220, 0))
    return canvas


def _covering(result: dict) -> list[tuple[float, str, int]]:
    """(share, label, its index) of the --segment labels that cover any pixel, largest first."""
    shares = [(v, name, k) for k, (name, v) in enumerate(result.get("segments", {}).items()) if v > 0]
    return sorted(shares, key=lambda item: -item[0])


def _labels_line(ranked: list[dict]) -> str:
    return ", ".join(f"{r['label']} {r['score']:.3f}" for r in ranked)


def format_result(result: dict) -> str:
    lines = [f"image: {_labels_line(result['image'])}"] if result["image"] else []
    for k, item in enumerate(result["boxes"]):
        box = ", ".join(f"{v:.3f}" for v in item["box"])
        lines.append(f"box {k} [{box}]: {_labels_line(item['labels'])}")
    for item in result["ground"]:
        box = ", ".join(f"{v:.3f}" for v in item["box"])
        lines.append(f"{item['phrase']!r} -> [{box}] (similarity {item['score']:.3f})")
    if covering := _covering(result):  # --json has every label
        lines.append("segments: " + ", ".join(f"{name} {100 * share:.1f}%" for share, name, _ in covering))
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model or not FLAGS.image:
        raise app.UsageError("--model and --image are required")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    try:
        image = read_image(FLAGS.image)
        labels = parse_labels(FLAGS.labels) if FLAGS.labels else []
        boxes = parse_boxes(FLAGS.boxes, *image.shape[:2]) if FLAGS.boxes else None
        templates = parse_templates(FLAGS.template)
        if boxes is not None and not labels and not FLAGS.heatmap:
            raise ValueError("--boxes needs --labels to classify them")
        segment = parse_labels(FLAGS.segment) if FLAGS.segment else []
        model = load(FLAGS.model)
        result = predict(model, image, labels, boxes, FLAGS.ground, FLAGS.top_k, FLAGS.heatmap, templates, segment)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(format_result(result))
    if FLAGS.out:
        draw(image, result).save(FLAGS.out)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            shown = {k: v for k, v in result.items() if k != "classes"}  # the class map is drawn, not listed
            json.dump({**shown, "heatmaps": {t: m.tolist() for t, m in result["heatmaps"].items()}}, f, indent=1)


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("model", None, "export dir, training workdir, hf:DIR, open_clip:DIR, big_vision:FILE")
    flags.DEFINE_string("image", None, "the image file")
    flags.DEFINE_string("labels", "", "comma-separated labels, or a file with one per line")
    flags.DEFINE_multi_string("template", [], 'a prompt with {} for the label, e.g. "a photo of a {}." (repeat)')
    flags.DEFINE_string("boxes", "", "x0,y0,x1,y1[;...] in pixels or normalised, or a JSON file of boxes")
    flags.DEFINE_multi_string("ground", [], "a phrase to ground (repeat for several)")
    flags.DEFINE_integer("top_k", 5, "labels shown per image and box")
    flags.DEFINE_string("out", "", "write the image with boxes, labels and scores drawn here (PNG)")
    flags.DEFINE_bool("heatmap", False, "lay the first phrase's (else label's) similarity map over the picture")
    flags.DEFINE_string("json", "", "write the results here as JSON")
    flags.DEFINE_string(
        "segment", "", "label every pixel with one of these (comma-separated or a file): --out draws it"
    )
    app.run(main)
