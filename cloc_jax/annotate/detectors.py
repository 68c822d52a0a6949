"""Open-vocabulary detectors behind one interface, for pseudo-labelling.

`detector.detect(images, queries) -> detections`: images are uint8 [H, W, 3] of any size; queries a
list of phrases per image; each image gets a list of `Detection`s (box xyxy normalised to that image,
a score, the index of its query). Thresholds, NMS and the stability filter live in `label.py`.

- `ClocGrounder`: a trained cloc_jax checkpoint (exported) grounds each query with its Prompter's box
  head (self-labelling); the score is the cosine similarity between the region embedding of the box
  and the query's text embedding.
- `Owlv2Detector`: OWLv2 through transformers (PyTorch), from a local weights directory.
"""

import dataclasses

import numpy as np

from cloc_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # xyxy in [0, 1]
    score: float
    query: int


def _bucket(n: int) -> int:
    """Queries are padded to a power of two, so a handful of shapes is ever compiled."""
    return 1 << max(0, (n - 1).bit_length())


class ClocGrounder:
    def __init__(self, encoder, batch_size: int = 32):
        if not encoder.can_ground:
            raise ValueError(
                f"ClocGrounder needs a grounding head; this checkpoint's is {encoder.model.head.description}"
            )
        self.encoder, self.batch_size = encoder, batch_size

    @classmethod
    def from_export(cls, directory: str, batch_size: int = 32) -> "ClocGrounder":
        from cloc_jax.weights import load

        return cls(load(directory), batch_size)

    def detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            out += self._detect(images[start : start + self.batch_size], queries[start : start + self.batch_size])
        return out

    def _detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[list[Detection]]:
        size, count = self.encoder.image_size, len(images)
        q = _bucket(max(1, max(len(x) for x in queries)))
        canvas = np.zeros((self.batch_size, size, size, 3), np.float32)
        extent = np.ones((self.batch_size, 4), np.float32)  # the image's share of the padded canvas
        texts = [[""] * q for _ in range(self.batch_size)]
        for i, (image, phrases) in enumerate(zip(images, queries)):
            padded, corner = transforms.resize_pad(image, np.ones((1, 4), np.float32), size)
            canvas[i] = padded.astype(np.float32) / 127.5 - 1.0
            extent[i] = corner[0]
            texts[i][: len(phrases)] = phrases
        boxes = self.encoder.ground(canvas, texts)  # [B, Q, 4] on the canvas
        regions = self.encoder.encode_regions(canvas, boxes)  # [B, Q, E]
        words = self.encoder.encode_text([t for row in texts for t in row]).reshape(self.batch_size, q, -1)
        scores = np.sum(regions * words, axis=-1)
        boxes = np.clip(boxes / extent[:, None, :], 0.0, 1.0)  # canvas -> the image's own coordinates
        return [
            [Detection(tuple(map(float, boxes[i, j])), float(scores[i, j]), j) for j in range(len(queries[i]))]
            for i in range(count)
        ]


class Owlv2Detector:
    """OWLv2 (`Owlv2ForObjectDetection`) from `model_dir` (a transformers checkpoint); every predicted
    box with its best query. Needs `torch`; weights are not downloaded here."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.torch = torch
        self.processor = Owlv2Processor.from_pretrained(model_dir)
        self.model = Owlv2ForObjectDetection.from_pretrained(model_dir).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings  # 16 tokens per query

    def detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[list[Detection]]:
        out = []
        for image, phrases in zip(images, queries):
            if not phrases:
                out.append([])
                continue
            inputs = self.processor(
                text=[phrases],
                images=image,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with self.torch.no_grad():
                outputs = self.model(**inputs)
            h, w = image.shape[:2]
            side = max(h, w)  # OWLv2 pads to a square: boxes come back on the padded square
            post = self.processor.post_process_grounded_object_detection
            (result,) = post(outputs, threshold=0.0, target_sizes=[(side, side)])
            boxes = np.clip(result["boxes"].numpy() / np.array([w, h, w, h]), 0.0, 1.0)
            out.append(
                [
                    Detection(tuple(map(float, b)), float(s), int(q))
                    for b, s, q in zip(boxes, result["scores"].numpy(), result["labels"].numpy())
                ]
            )
        return out


def from_spec(spec: str, batch_size: int = 32):
    """'cloc:EXPORT_DIR' or 'owlv2:MODEL_DIR' -> a detector (one-line error otherwise)."""
    kind, _, path = spec.partition(":")
    if kind == "cloc" and path:
        return ClocGrounder.from_export(path, batch_size)
    if kind == "owlv2" and path:
        return Owlv2Detector(path)
    raise ValueError(f"detector {spec!r}: expected cloc:EXPORT_DIR or owlv2:MODEL_DIR")
