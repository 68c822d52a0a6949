import json

import numpy as np
import pytest

from cloc_jax.tokenizers import ByteTokenizer, from_spec, tokenize

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
    ids = tok.encode("A Red box")
    assert vocab["red</w>"] + 1 in ids and ids[-1] == tok.eot_id and 0 not in ids
    assert tok.decode(ids) == "a red box"


@pytest.mark.parametrize("kind", ["sentencepiece", "clip_bpe"])
def test_missing_vocab_file_is_a_one_line_error(kind):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path='/nope/vocab' does not exist"):
        from_spec(dict(type=kind, path="/nope/vocab"))


def test_unknown_type():
    with pytest.raises(ValueError, match=r"tokenizer\.type='wordpiece'"):
        from_spec(dict(type="wordpiece"))
