import json
import os

import numpy as np
import pytest

from cloc_jax.config import load_config_file
from cloc_jax.data.scenes import WORDS, Scenes
from cloc_jax.tokenizers import ByteTokenizer, WordTokenizer, from_spec, tokenize
from tests.conftest import ROOT

TEXTS = ["a red circle left of the blue star", "Ünïcödé → 漢字 ✓", "", "UPPER case"]


def test_byte_tokenizer_round_trips_any_string():
    tok = ByteTokenizer(lowercase=False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[-1] == tok.eot_id and min(ids) > 0
        assert tok.decode(ids) == text


def test_lowercasing_and_padded_vocab():
    tok = ByteTokenizer(lowercase=True)
    assert tok.decode(tok.encode("UPPER case")) == "upper case"
    assert tok.padded_vocab_size == 384 and tok.padded_vocab_size % 128 == 0


def test_tokenize_pads_and_truncates_keeping_eot_last():
    tok = ByteTokenizer()
    out = tokenize(tok, ["abc", "x" * 50], context_length=8)
    assert out.shape == (2, 8) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0], [99, 100, 101, 1, 0, 0, 0, 0])
    assert out[1, -1] == tok.eot_id and (out[1, :-1] == ord("x") + 2).all()
    assert tok.decode(out[0]) == "abc"


def test_sentencepiece_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle left of a blue square", "the green triangle above the star"] * 50))
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, minloglevel=2, vocab_size=24, pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    tok = from_spec(dict(type="sentencepiece", path=prefix + ".model", lowercase=True))
    text = "a green circle above the red square"
    ids = tok.encode(text.upper())
    assert ids[-1] == tok.eot_id == 1 and 0 not in ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 24


def test_clip_bpe_round_trip(tmp_path):
    pytest.importorskip("transformers")
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {s: i for i, s in enumerate(letters + [c + "</w>" for c in letters] + ["re", "red</w>"])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tok = from_spec(dict(type="clip_bpe", path=str(tmp_path), lowercase=True))
    ids = tok.encode("A Red box")  # transformers' CLIPTokenizer ids: start-of-text first, no shift
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == tok.eot_id == vocab["<|endoftext|>"]
    assert vocab["red</w>"] in ids
    assert tok.decode(ids) == "a red box"


def test_word_tokenizer_round_trips_and_marks_unknown_words(tmp_path):
    vocab = tmp_path / "words.txt"
    vocab.write_text("a\nred\ncircle\n,\nand\n\n")  # blank lines are ignored
    tok = from_spec(dict(type="words", path=str(vocab), lowercase=True))
    assert tok.vocab_size == 8 and tok.padded_vocab_size == 128
    ids = tok.encode("A red circle, and a red  CIRCLE")
    assert ids == [3, 4, 5, 6, 7, 3, 4, 5, 1]
    assert tok.decode(ids) == "a red circle, and a red circle"
    assert tok.encode("a blue circle") == [3, 2, 5, 1] and tok.decode([3, 2, 5, 1]) == "a <unk> circle"


def test_word_tokenizer_refuses_a_vocabulary_with_duplicates(tmp_path):
    vocab = tmp_path / "words.txt"
    vocab.write_text("red\nblue\nred\n")
    with pytest.raises(ValueError, match="lists a word twice"):
        WordTokenizer(str(vocab))


def test_scenes_vocabulary_covers_every_scene_text_within_cloc_tiny_contexts():
    config = load_config_file(os.path.join(ROOT, "configs", "cloc_tiny.py"))
    tok = from_spec(config.tokenizer)
    assert config.tokenizer.path == WORDS
    for split in ("train", "heldout"):
        for record in map(Scenes(split, size=300).__getitem__, range(300)):
            for texts, context in (
                (record["captions"], config.tokenizer.context_length),
                (record["region_texts"] + record["referring"], config.tokenizer.region_context_length),
            ):
                for text in texts:
                    ids = tok.encode(text)
                    assert tok.unk_id not in ids and len(ids) <= context, text
                    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["sentencepiece", "clip_bpe", "words"])
def test_missing_vocab_file_is_a_one_line_error(kind):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path='/nope/vocab' does not exist"):
        from_spec(dict(type=kind, path="/nope/vocab"))


def test_unknown_type():
    with pytest.raises(ValueError, match=r"tokenizer\.type='wordpiece'"):
        from_spec(dict(type="wordpiece"))
