import jax
import numpy as np
import pytest

from cloc_jax.data.pipeline import eval_batches, make_source, train_iterator
from cloc_jax.data.scenes import CLASS_NAMES, COLOURS, HELDOUT_COMBOS, Scenes
from cloc_jax.tokenizers import ByteTokenizer, tokenize


def test_same_seed_same_scene_different_seed_different_scene():
    a, b, c = Scenes(seed=0)[17], Scenes(seed=0)[17], Scenes(seed=1)[17]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["captions"] == b["captions"] and a["referring"] == b["referring"]
    assert not np.array_equal(a["image"], c["image"])


def test_heldout_combinations_never_appear_in_train_but_do_in_heldout():
    train = {CLASS_NAMES[label] for i in range(1500) for label in Scenes("train")[i]["region_labels"]}
    heldout = {CLASS_NAMES[label] for i in range(1500) for label in Scenes("heldout")[i]["region_labels"]}
    assert not train & HELDOUT_COMBOS
    assert heldout >= HELDOUT_COMBOS
    assert len(train) == len(CLASS_NAMES) - len(HELDOUT_COMBOS)


@pytest.mark.parametrize("index", range(0, 400, 7))
def test_boxes_are_tight_around_the_named_objects(index):
    scene = Scenes("heldout", image_size=64)[index]
    image, side = scene["image"].astype(int), 64
    assert len(scene["boxes"]) == len(scene["region_texts"]) == len(scene["referring"]) >= 1
    for box, text in zip(scene["boxes"], scene["region_texts"]):
        assert (box >= 0).all() and (box <= 1).all() and (box[2:] > box[:2]).all()
        colour = np.array(COLOURS[text.split()[1]])
        close = np.abs(image - colour[None, None] * 0.93).max(-1) <= 0.08 * 255
        x0, y0, x1, y1 = np.round(box * side).astype(int)
        inside = close[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1].sum()
        assert inside >= 4, f"no {text} pixels inside its box"
    (caption,) = scene["captions"]
    assert caption.count(" a ") + 1 == len(scene["boxes"]) or len(scene["boxes"]) == 1
    for text in scene["region_texts"]:
        assert text in caption


def test_train_batches_have_static_shapes_masks_and_are_deterministic(config):
    tok = ByteTokenizer()
    first = next(train_iterator(config, tok))
    again = next(train_iterator(config, tok))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    b, m, length = config.batch_size, config.data.max_regions, config.tokenizer.context_length
    assert first["image"].shape == (b, 32, 32, 3) and first["image"].dtype == np.float32
    assert first["image"].min() >= -1.0 and first["image"].max() <= 1.0
    assert first["tokens"].shape == (b, length)
    assert first["boxes"].shape == (b, m, 4) and first["region_tokens"].shape == (b, m, length)
    mask = first["region_mask"]
    assert (first["region_labels"][~mask] == -1).all() and (first["region_tokens"][~mask] == 0).all()
    assert (first["boxes"][~mask] == 0).all() and (first["region_labels"][mask] >= 0).all()
    assert len(set(first["index"].tolist())) == b


def test_eval_batches_cover_the_split_once_and_mark_padding(config):
    source = make_source(config.data, "heldout", config.image_size)
    count, batches = eval_batches(config, source, ByteTokenizer(), 16, max_regions=4, max_captions=3)
    batches = list(batches)
    assert count == 3 and [b["image"].shape[0] for b in batches] == [16, 16, 16]
    ids = np.concatenate([b["index"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(40))


def test_every_host_gets_the_same_number_of_batches_and_together_every_record(config, monkeypatch):
    """3 simulated hosts over 40 records with 5 unusable ones, all on host 0: it ends in padding batches."""
    source = make_source(config.data, "heldout", config.image_size)

    class Damaged:
        class_names = source.class_names

        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            record = source[i]
            return dict(record, image=b"broken") if i % 3 == 0 and i < 15 else record

    seen, counts = [], []
    for host in range(3):
        monkeypatch.setattr(jax, "process_index", lambda h=host: h)
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        count, batches = eval_batches(config, Damaged(), ByteTokenizer(), 4, max_regions=4, max_captions=3)
        batches = list(batches)
        assert len(batches) == count == 4  # ceil(ceil(40 / 3) / 4)
        counts.append(sum(int(b["valid"].sum()) for b in batches))
        seen += [int(i) for b in batches for i in b["index"][b["valid"]]]
    assert counts == [9, 13, 13]  # host 0 holds records 0, 3, ..., 39: five of them broken
    assert sorted(seen) == [i for i in range(40) if not (i % 3 == 0 and i < 15)]


def test_eval_rows_hold_every_caption_and_every_referring_expression(config):
    from cloc_jax.data.rows import DataStats, Preprocess

    record = Scenes("heldout", image_size=32)[0]
    n = len(record["boxes"])
    record["captions"] = [f"caption {i}" for i in range(5)]
    record["referring"] = [["the first", "the left one", "  "]] + [f"box {i}" for i in range(1, n)]
    stats = DataStats()
    tok = ByteTokenizer()
    prep = Preprocess(tok, config.tokenizer, 32, max_regions=n + 1, stats=stats, max_captions=4)
    out = prep.map(record)
    assert out["caption_mask"].tolist() == [True] * 4
    np.testing.assert_array_equal(out["captions"][3], tokenize(tok, ["caption 3"], config.tokenizer.context_length)[0])
    assert stats.snapshot() == {"data/dropped/captions_over_eval_max": 1}
    # box 0 has two non-empty expressions, every other box one: n + 1 pairs, box 0 twice
    assert out["ground_mask"].sum() == n + 1
    np.testing.assert_array_equal(out["ground_boxes"][0], out["ground_boxes"][1])
    np.testing.assert_array_equal(out["ground_boxes"][2], out["boxes"][1])
    length = config.tokenizer.region_context_length
    expected = tokenize(tok, ["the first", "the left one", "box 1"], length)
    np.testing.assert_array_equal(out["ground_tokens"][:3], expected)
    np.testing.assert_array_equal(out["referring_tokens"][0], expected[0])  # the first stands for the box


def test_bad_boxes_are_repaired_or_dropped_and_counted(config):
    from cloc_jax.data.rows import DataStats, Preprocess

    record = Scenes("train", image_size=32)[3]
    n = len(record["boxes"])
    record["boxes"] = np.concatenate([record["boxes"], [[np.nan, 0, 1, 1], [0.5, 0.5, 0.5, 0.9], [0.9, 0.8, 0.2, 0.1]]])
    record["region_texts"] += ["nan box", "flat box", "swapped box"]
    record["referring"] += ["nan box", "flat box", "swapped box"]
    record["region_labels"] = np.concatenate([record["region_labels"], [1, 2, 3]])
    stats = DataStats()
    out = Preprocess(ByteTokenizer(), config.tokenizer, 32, max_regions=8, stats=stats).map(record)
    assert stats.snapshot() == {"data/dropped/boxes": 2}
    assert out["region_mask"].sum() == n + 1 and np.isfinite(out["boxes"]).all()
    np.testing.assert_allclose(out["boxes"][n], [0.2, 0.1, 0.9, 0.8])
    assert out["region_labels"][n] == 3


def test_training_samples_m_regions_and_mixes_in_referring_expressions(config):
    from cloc_jax.data.rows import Preprocess

    tok = ByteTokenizer()
    config.tokenizer.region_context_length = 64  # long enough for whole referring expressions
    prep = Preprocess(tok, config.tokenizer, 32, max_regions=2, referring_prob=0.5, augment=config.data.augment)
    source = Scenes("train", image_size=32)
    index = next(i for i in range(100) if len(source[i]["boxes"]) == 4)
    record = source[index]
    seen_boxes, texts = set(), set()
    for seed in range(30):
        out = prep.random_map(source[index], np.random.default_rng(seed))
        assert out["region_mask"].sum() == 2
        seen_boxes.update(tuple(np.round(b, 4)) for b in out["boxes"])
        texts.update(tok.decode(t) for t in out["region_tokens"])
    assert len(seen_boxes) == 4  # every region gets sampled
    assert set(record["region_texts"]) & texts and set(record["referring"]) & texts


def test_fits_in_row_keeps_texts_in_order_while_they_fit():
    from cloc_jax.data.rows import fits_in_row

    tokens = np.zeros((4, 6), np.int32)
    for row, n in enumerate([3, 5, 2, 1]):
        tokens[row, :n] = 7
    np.testing.assert_array_equal(fits_in_row(tokens, 6), [True, False, True, True])  # 3 + 2 + 1
    np.testing.assert_array_equal(fits_in_row(tokens, 11), [True, True, True, True])
    assert fits_in_row(tokens[:0], 6).shape == (0,)


def test_training_with_packing_drops_and_counts_regions_that_do_not_fit(config):
    from cloc_jax.data.rows import DataStats, Preprocess

    tok = ByteTokenizer()
    config.tokenizer.update(region_context_length=8, region_pack_length=16)
    stats = DataStats()
    prep = Preprocess(tok, config.tokenizer, 32, max_regions=4, augment=config.data.augment, stats=stats)
    source = Scenes("train", image_size=32)
    index = next(i for i in range(100) if len(source[i]["boxes"]) == 4)
    out = prep.random_map(source[index], np.random.default_rng(0))
    # Byte texts are cut to 8 tokens, so two of the four regions fill the row of 16.
    assert out["region_mask"].sum() == 2 and stats.snapshot() == {"data/dropped/regions_over_pack_length": 2}
    assert (out["region_tokens"][2:] == 0).all() and (out["region_labels"][2:] == -1).all()
    evaluation = prep.map(source[index])  # evaluation never packs: every region is scored
    assert evaluation["region_mask"].sum() == 4
