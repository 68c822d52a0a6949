"""SAM pseudo-masks: jittered box prompts, the stability filter, records in and out, a tiny random SamModel saved
as files, and the Beam pipeline with a masker only (box-only shards -> masked shards the training rows read)."""

import os

import numpy as np
import pytest

from cloc_jax.annotate import beam
from cloc_jax.annotate.sam import MaskConfig, SamMasker, add_masks, jittered, mask_iou
from cloc_jax.data import preprocess, records
from cloc_jax.data.masks import decode_masks
from tests.data import fixtures


def _box_fill(box, h, w) -> np.ndarray:
    x0, y0, x1, y1 = np.round(np.asarray(box) * [w, h, w, h]).astype(int)
    out = np.zeros((h, w), bool)
    out[y0:y1, x0:x1] = True
    return out


def small(box) -> bool:
    return box[2] - box[0] < 0.27  # the scenes' small shapes are 0.16-0.24 wide, large ones 0.3-0.42


class BoxOrNoise:
    """A stand-in masker: a small box (the scenes' small shapes; jitter keeps a box's size) gets its filled box
    (IoU about 0.8 under 5% jitter), a large one a mask of noise seeded by the prompt (a different mask for each
    jittered prompt: IoU about 1/3)."""

    def masks(self, image, boxes):
        h, w = image.shape[:2]
        out = []
        for box in boxes:
            if small(box):
                out.append(_box_fill(box, h, w))
            else:
                seed = int(abs(hash(tuple(np.round(box, 4)))) % 2**32)
                out.append(np.random.default_rng(seed).random((h, w)) > 0.5)
        return np.stack(out) if out else np.zeros((0, h, w), bool)


def test_jittered_boxes_move_along_the_diagonal():
    boxes = np.array([[0.2, 0.2, 0.6, 0.4], [0.0, 0.9, 0.5, 1.0]], np.float32)
    got = jittered(boxes, 0.1)
    np.testing.assert_allclose(got[0, 0], [0.24, 0.22, 0.64, 0.42], atol=1e-6)  # + 0.1 x (0.4 wide, 0.2 high)
    np.testing.assert_allclose(got[1, 0], [0.16, 0.18, 0.56, 0.38], atol=1e-6)
    np.testing.assert_allclose(got[0, 1], [0.05, 0.91, 0.55, 1.0], atol=1e-6)  # clipped to the image
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 of 12 pixels shared
    np.testing.assert_allclose(mask_iou(a, b), [4 / 12, 0.0])


def test_add_masks_keeps_stable_masks_and_empties_unstable_ones():
    recs = fixtures.scene_records(12)
    box_only = [dict(r, masks=[]) for r in recs]
    out, counts = add_masks(box_only, BoxOrNoise(), MaskConfig(mask_jitter=0.05, min_mask_stability=0.6))
    stable = unstable = 0
    for record, original in zip(out, recs):
        h, w = original["masks"].shape[1:]
        masks, problem = decode_masks(record["masks"], len(record["boxes"]), h, w)
        assert problem is None
        for box, mask in zip(record["boxes"], masks):
            if small(box):
                np.testing.assert_array_equal(mask, _box_fill(box, h, w))
                stable += 1
            else:
                assert not mask.any()
                unstable += 1
        np.testing.assert_array_equal(record["boxes"], original["boxes"])  # boxes and texts stay
        assert record["region_texts"] == original["region_texts"]
    assert stable and unstable
    assert counts == dict(images=12, masks=stable, unstable=unstable, skipped=0)
    _, counts = add_masks(box_only, BoxOrNoise(), MaskConfig(min_mask_stability=0.0))
    assert counts["masks"] == stable + unstable and counts["unstable"] == 0
    broken = dict(box_only[0], image=b"not an image")
    out, counts = add_masks([broken], BoxOrNoise(), MaskConfig())
    assert counts["skipped"] == 1 and out[0]["masks"] == []


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> str:
    """A randomly initialised SamModel (2 vision layers, 32 wide, 64 px) and its processor, saved as files."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    directory = str(tmp_path_factory.mktemp("sam"))
    torch.manual_seed(0)
    config = SamConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
            output_channels=16, mlp_dim=64, global_attn_indexes=[1], window_size=2, num_pos_feats=8,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, image_embedding_size=4,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )  # fmt: skip
    SamModel(config).save_pretrained(directory)
    processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(processor).save_pretrained(directory)
    return directory


def test_tiny_sam_masks_boxed_records_through_the_beam_pipeline(tiny_sam, tmp_path):
    """Box-only shards in, masked shards out (masker only, every mask kept): one mask per box at the image's size,
    equal to what the masker gives in-process."""
    masker = SamMasker(tiny_sam)
    recs = [dict(r, masks=[]) for r in fixtures.scene_records(6)]
    image = preprocess.decode(recs[0]["image"])
    direct = masker.masks(image, recs[0]["boxes"])
    assert direct.shape == (len(recs[0]["boxes"]), *image.shape[:2]) and direct.dtype == bool
    pattern = fixtures.write_array_record(str(tmp_path / "boxed"), recs, num_shards=2)
    out = str(tmp_path / "masked")
    cfg = MaskConfig(min_mask_stability=0.0)
    counts = beam.run(pattern, out, None, masker=lambda: SamMasker(tiny_sam), mask_cfg=cfg)
    assert counts == dict(shards=2, images=6, masks=sum(len(r["boxes"]) for r in recs), unstable=0, skipped=0)
    masked = records.ArrayRecordSource(os.path.join(out, "*.array_record"))
    by_caption = {r["captions"][0]: r for r in recs}
    for i in range(len(masked)):
        got = masked[i]
        h, w = preprocess.decode(got["image"]).shape[:2]
        masks, problem = decode_masks(got["masks"], len(got["boxes"]), h, w)
        assert problem is None and masks.shape == (len(got["boxes"]), h, w)
        if got["captions"] == recs[0]["captions"]:
            np.testing.assert_array_equal(masks, direct)
        assert len(got["boxes"]) == len(by_caption[got["captions"][0]]["boxes"])
    with pytest.raises(ValueError, match=r"detector .* masker"):
        beam.run(pattern, out, None)
    with pytest.raises(ValueError, match="sam:MODEL_DIR"):
        SamMasker.from_spec("sam2:/x")
