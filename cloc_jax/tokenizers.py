"""Tokenizers: byte-level (default, needs no file), SentencePiece (the T5 tokenizer CLOC used), CLIP BPE, and
a closed word vocabulary (for a small corpus such as the embedded scenes, where bytes make texts 4x longer).

Convention shared by all: id 0 is padding, every text ends with an end-of-text (EOT) id, and
`tokenize` pads or truncates to a fixed context length keeping EOT last (the text tower pools there).
"""

import os
import re

import ml_collections
import numpy as np

TYPES = ("bytes", "sentencepiece", "clip_bpe", "words")
VOCAB_MULTIPLE = 128  # pad the embedding table so the `vocab` axis shards on any mesh


class Tokenizer:
    """Base: subclasses define `vocab_size`, `eot_id`, `_encode(str) -> ids` and `_decode(ids) -> str`."""

    vocab_size: int
    eot_id: int

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase

    def encode(self, text: str) -> list[int]:
        """Ids (all > 0) ending with EOT, not truncated."""
        return [*self._encode(text.lower() if self.lowercase else text), self.eot_id]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eot_id)] if self.eot_id in ids else [i for i in ids if i]
        return self._decode(ids)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 2: 0 = pad, 1 = EOT. Any string round-trips."""

    vocab_size = 258
    eot_id = 1

    def _encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (e.g. T5's spiece.model). Ids shift by 1 unless the model pads with 0."""

    def __init__(self, path: str, lowercase: bool = True):
        import sentencepiece

        super().__init__(lowercase)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.shift = 0 if self.sp.pad_id() == 0 else 1
        eos = self.sp.eos_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {path} defines no end-of-sequence id")
        self.eot_id = eos + self.shift
        self.vocab_size = self.sp.get_piece_size() + self.shift

    def _encode(self, text: str) -> list[int]:
        return [i + self.shift for i in self.sp.encode(text)]

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode([i - self.shift for i in ids])


class ClipBpeTokenizer(Tokenizer):
    """OpenAI CLIP's BPE from a folder holding vocab.json and merges.txt (ids shift by 1: 0 is padding)."""

    def __init__(self, path: str, lowercase: bool = True):
        from transformers import CLIPTokenizer

        super().__init__(lowercase)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        files = [os.path.join(folder, f) for f in ("vocab.json", "merges.txt")]
        for f in files:
            if not os.path.exists(f):
                raise FileNotFoundError(f"tokenizer.path={path}: CLIP BPE needs {f}, which does not exist")
        self.bpe = CLIPTokenizer(*files)
        self.eot_id = self.bpe.eos_token_id + 1
        self.vocab_size = len(self.bpe) + 1

    def _encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.bpe.encode(text, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.bpe.decode([i - 1 for i in ids], clean_up_tokenization_spaces=True).strip()


class WordTokenizer(Tokenizer):
    """Words and punctuation marks from a vocabulary file (one per line): 0 = pad, 1 = EOT, 2 = unknown."""

    eot_id, unk_id = 1, 2
    PATTERN = re.compile(r"\w+|[^\w\s]")

    def __init__(self, path: str, lowercase: bool = True):
        super().__init__(lowercase)
        with open(path, encoding="utf-8") as f:
            self.words = [line.strip() for line in f if line.strip()]
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"tokenizer.path={path}: the vocabulary lists a word twice")
        self.ids = {word: i + 3 for i, word in enumerate(self.words)}
        self.vocab_size = len(self.words) + 3

    def _encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_id) for word in self.PATTERN.findall(text)]

    def _decode(self, ids: list[int]) -> str:
        text = ""
        for i in ids:
            word = self.words[i - 3] if i >= 3 else "<unk>"
            punctuation = i >= 3 and re.fullmatch(r"[^\w\s]", word)
            text += word if punctuation or not text else f" {word}"  # "circle , a" -> "circle, a"
        return text


def from_spec(spec: ml_collections.ConfigDict | dict) -> Tokenizer:
    """`spec` holds type, path and lowercase (see configs/common.py)."""
    kind, path, lowercase = spec["type"], spec.get("path", ""), spec.get("lowercase", True)
    if kind not in TYPES:
        raise ValueError(f"tokenizer.type={kind!r}; choose one of {TYPES}")
    if kind == "bytes":
        return ByteTokenizer(lowercase)
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer.path={path!r} does not exist; {kind} needs a vocab file")
    cls = {"sentencepiece": SentencePieceTokenizer, "clip_bpe": ClipBpeTokenizer, "words": WordTokenizer}[kind]
    return cls(path, lowercase)


def tokenize(tokenizer: Tokenizer, texts: list[str], context_length: int) -> np.ndarray:
    """[N] strings -> [N, context_length] int32; long texts keep their first tokens and end in EOT."""
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) > context_length:
            ids = [*ids[: context_length - 1], tokenizer.eot_id]
        out[row, : len(ids)] = ids
    return out
