"""Evaluation on device, sharded like training: per-host batches in, every host's rows out.

Each host passes its own rows ([B, ...], B = eval batch / processes); they become global arrays over the
mesh's batch axes, one jitted forward serves every output a data pass needs (`Model.evaluate`: the region
head shares the image forward between the image embedding, the regions and grounding), and the outputs are
gathered so that every host holds all rows in process order ([P * B, ...]) and computes the same metrics.
Texts (captions, class prompts) are encoded densely at the end, split across hosts the same way; class
prompts once per evaluation run.
"""

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cloc_jax import sharding
from cloc_jax.data.rows import HOST_FIELDS
from cloc_jax.evals.regions import crop_and_resize
from cloc_jax.inference import Encoder, class_embeddings
from cloc_jax.models.cloc import Model

OUTPUTS = ("image", "regions", "ground", "crops", "dense")
# Outputs each host keeps for its own rows (not gathered): dense [B, h, w, E] would be large on every host.
LOCAL_OUTPUTS = ("dense",)
TEXT_ROWS = 1024  # at most this many texts per host and call (ImageNet's 80,000 prompts: 79 calls on one host)


def _on_mesh(params, mesh: Mesh):
    """Parameters on the mesh: kept where training sharded them, else replicated (an imported model)."""
    devices = set(mesh.devices.flat)
    if all(leaf.sharding.device_set == devices for leaf in jax.tree.leaves(params)):
        return params
    replicated = NamedSharding(mesh, PartitionSpec())
    host = jax.tree.map(np.asarray, params)
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), host)


class EvalRunner:
    """An Encoder's model run over `mesh` for evaluation, `per_host` rows per host and call."""

    def __init__(self, encoder: Encoder, mesh: Mesh, per_host: int, across_hosts: bool = True):
        """`across_hosts=False`: `mesh` holds this host's devices only and nothing is gathered (each host
        works on its own, as `python -m cloc_jax.embed` does)."""
        self.across_hosts = across_hosts
        local = sharding.data_parallel_size(mesh) // (jax.process_count() if across_hosts else 1)
        if per_host % max(local, 1):
            raise ValueError(f"eval batch per host {per_host} is not divisible by its {local} data-parallel devices")
        self.encoder, self.mesh, self.per_host = encoder, mesh, per_host
        model = encoder.model
        self._text = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens, method=Model.encode_text))
        self._image = jax.jit(lambda p, images: model.apply({"params": p}, images, method=Model.encode_image))
        self._forwards = {}  # needs -> jitted forward
        self.set_params(encoder.params)

    def set_params(self, params) -> None:
        """New parameters (training evaluates as it goes): compiled functions stay, class prompts re-encode."""
        self.params = _on_mesh(params, self.mesh)
        self._classes = {}  # (class names, templates) -> [C, E]

    def _run(self, fn, local: dict) -> dict:
        """fn(params, **this host's rows) -> its outputs from every host (the LOCAL_OUTPUTS: this host's only)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.encoder.axis_rules):
            out = fn(self.params, **sharding.global_batch(local, self.mesh))
        if not self.across_hosts:
            return jax.device_get(out)
        if not isinstance(out, dict):
            return multihost_utils.process_allgather(out, tiled=True)
        spec = sharding.batch_sharding(self.mesh).spec
        own = {
            k: multihost_utils.global_array_to_host_local_array(out.pop(k), self.mesh, spec)
            for k in LOCAL_OUTPUTS
            if k in out
        }
        return {**multihost_utils.process_allgather(out, tiled=True), **jax.tree.map(np.asarray, own)}

    def gather(self, batch: dict) -> dict:
        """A per-host batch's fields but the image and the host fields -> every host's rows, in process order."""
        fields = {k: v for k, v in batch.items() if k != "image" and k not in HOST_FIELDS}
        return multihost_utils.process_allgather(fields, tiled=True) if self.across_hosts else fields

    def outputs(self, batch: dict, needs: frozenset, window: int = 0) -> dict:
        """One per-host batch -> {output: every host's rows (LOCAL_OUTPUTS: this host's)} for the `needs` (a subset
        of OUTPUTS). `window` > 0: the images are larger than the model's input and only "dense" is asked, from
        sliding windows of that size (`Model.dense_windows`)."""
        unknown = set(needs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"evaluation outputs {sorted(unknown)}; choose from {OUTPUTS}")
        if window:
            if set(needs) != {"dense"}:
                raise ValueError(f"sliding windows give dense outputs only, not {sorted(set(needs) - {'dense'})}")
            if window not in self._forwards:
                model = self.encoder.model
                self._forwards[window] = jax.jit(
                    lambda p, images: {"dense": model.apply({"params": p}, images, window, method=Model.dense_windows)}
                )
            return self._run(self._forwards[window], dict(images=batch["image"]))
        on_device = frozenset(needs - {"crops"})
        if on_device not in self._forwards:
            model = self.encoder.model
            self._forwards[on_device] = jax.jit(
                lambda p, images, boxes, ground_tokens: model.apply(
                    {"params": p}, images, boxes, ground_tokens, on_device, method=Model.evaluate
                )
            )
        inputs = dict(images=batch["image"], boxes=batch["boxes"], ground_tokens=batch["ground_tokens"])
        out = self._run(self._forwards[on_device], inputs)
        if "crops" in needs:
            out["crops"] = self._crops(batch["image"], batch["boxes"])
        return out

    def _crops(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Every (image, box) slot cropped and resized to the input size, padding included (one static
        shape), through the image tower -> [P * B, M, E]."""
        size, (b, m) = images.shape[1], boxes.shape[:2]
        crops = np.stack([crop_and_resize(im, box, size) for im, row in zip(images, boxes) for box in row])
        chunks = [self._run(self._image, dict(images=crops[i : i + b])) for i in range(0, len(crops), b)]
        chunks = [c.reshape(-1, b, c.shape[-1]) for c in chunks]  # each [P, B, E]: chunk i of every host
        return np.stack(chunks, 1).reshape(-1, m, chunks[0].shape[-1])

    def encode(self, texts) -> np.ndarray:
        """Strings or tokens [N, L], the same on every host -> unit embeddings [N, E], each host encoding
        its part of every chunk (P x the batch doubled as far as N needs, up to TEXT_ROWS per host: few
        compiled shapes, little padding)."""
        tokens = texts if isinstance(texts, np.ndarray) else self.encoder.tokenize(texts)
        n = len(tokens)
        hosts, rank = (jax.process_count(), jax.process_index()) if self.across_hosts else (1, 0)
        rows = self.per_host  # a multiple of the image batch (divisible over the devices), doubled up to
        while rows * 2 <= max(TEXT_ROWS, self.per_host) and rows * hosts < n:  # what n needs
            rows *= 2
        chunk = rows * hosts
        pad = -n % chunk if n else chunk  # no texts: one padding chunk still gives the [0, E] shape
        padded = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
        out = [
            self._run(self._text, dict(tokens=padded[i + rank * rows :][:rows])) for i in range(0, len(padded), chunk)
        ]
        return np.concatenate(out)[:n]

    def sum_over_hosts(self, array: np.ndarray) -> np.ndarray:
        """An array of statistics of this host's rows -> its sum over every host (the same on each)."""
        if not self.across_hosts or jax.process_count() == 1:
            return array
        return np.asarray(multihost_utils.process_allgather(array)).sum(0)

    def classes(self, class_names, templates) -> np.ndarray:
        """[C, E] unit vectors, each class the normalised mean of its prompts over templates (encoded once
        per evaluation run for every evaluator that asks)."""
        key = (tuple(class_names), tuple(templates))
        if key not in self._classes:
            self._classes[key] = class_embeddings(self.encode, class_names, templates)
        return self._classes[key]
