"""Tokenizers: byte-level (default, needs no file), SentencePiece (the T5 tokenizer CLOC used), CLIP BPE, a
closed word vocabulary (for a small corpus such as the embedded scenes, where bytes make texts 4x longer), and
the tokenizers of imported checkpoints with their source's exact ids: a transformers tokenizer folder (`hf`)
and open_clip's own rules (`open_clip`).

Convention shared by all: every text ends with an end-of-text (EOT) id, and `tokenize` pads with `pad_id`
(0 unless a checkpoint says otherwise) or truncates to a fixed context length keeping EOT last (the text
tower pools there). Our own tokenizers keep id 0 for padding; imported ones keep the source's ids, where 0
can be a real token: a causal tower pooled at EOT never sees what follows EOT, so 0-padding is exact.
"""

import dataclasses
import functools
import gzip
import html
import os
import re
import string
import tempfile

import numpy as np

TYPES = ("bytes", "sentencepiece", "clip_bpe", "words", "hf", "open_clip", "big_vision")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
OPEN_CLIP_CLEAN = ("lower", "whitespace", "canonicalize")
T5_SENTENCEPIECE = "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"  # CLOC's tokenizer (big_vision's c4_en)
VOCAB_MULTIPLE = 128  # pad the embedding table so the `vocab` axis shards on any mesh


class Tokenizer:
    """Base: subclasses define `vocab_size`, `eot_id`, `_encode(str) -> ids` and `_decode(ids) -> str`."""

    vocab_size: int
    eot_id: int
    pad_id: int = 0

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
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except RuntimeError as e:
            raise ValueError(f"tokenizer.path={path!r} is not a SentencePiece model ({e})") from None
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


class BigVisionTokenizer(SentencePieceTokenizer):
    """big_vision's SigLIP text pipeline (pp `tokenize(eos="sticky", pad_value=1)`; SigLIP 2's `tok`): the
    SentencePiece model's own ids (no shift), ASCII lower-casing as tf.strings.lower, EOS appended, padded
    with `pad_id` (SigLIP: EOS; SigLIP 2: the pad token), which the tower reads at the last position."""

    def __init__(self, path: str, lowercase: bool = True, pad_id: int = 1):
        super().__init__(path, lowercase=False)
        self.ascii_lower, self.shift, self.pad_id = lowercase, 0, pad_id
        self.eot_id, self.vocab_size = self.sp.eos_id(), self.sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text.translate(_ASCII_LOWER) if self.ascii_lower else text)


class _Transformers(Tokenizer):
    """A transformers tokenizer: its ids exactly, special tokens included (CLIP: SOT ... EOT; SigLIP: ... EOS)."""

    def __init__(self, tok, lowercase: bool, pad_id: int):
        super().__init__(lowercase)
        self.tok, self.pad_id = tok, pad_id
        self.eot_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(self._clean(text))["input_ids"])

    def _clean(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eot_id) + 1] if self.eot_id in ids else ids
        return self.tok.decode(ids, skip_special_tokens=True).strip()


class ClipBpeTokenizer(_Transformers):
    """OpenAI CLIP's BPE from a folder holding vocab.json and merges.txt: transformers' CLIPTokenizer ids."""

    def __init__(self, path: str, lowercase: bool = True, pad_id: int = 0):
        from transformers import CLIPTokenizer

        folder = path if os.path.isdir(path) else os.path.dirname(path)
        files = [os.path.join(folder, f) for f in ("vocab.json", "merges.txt")]
        for f in files:
            if not os.path.exists(f):
                raise FileNotFoundError(f"tokenizer.path={path}: CLIP BPE needs {f}, which does not exist")
        super().__init__(CLIPTokenizer(*files), lowercase, pad_id)


class HFTokenizer(_Transformers):
    """A folder a transformers tokenizer was saved to (`save_pretrained`; CLIP, SigLIP, ...)."""

    def __init__(self, path: str, lowercase: bool = False, pad_id: int = 0):
        from transformers import AutoTokenizer

        super().__init__(AutoTokenizer.from_pretrained(path), lowercase, pad_id)


@functools.cache
def clip_vocab_files(gz_path: str, specials: tuple[str, str] = ("<|startoftext|>", "<|endoftext|>")) -> tuple[str, str]:
    """open_clip's merges file (bpe_simple_vocab_16e6.txt.gz) -> vocab.json + merges.txt that transformers'
    CLIPTokenizer reads: the same vocabulary, built the way open_clip builds it."""
    import json

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(gz_path) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    vocab += list(specials)
    folder = tempfile.mkdtemp(prefix="open_clip_bpe_")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")


class OpenClipTokenizer(_Transformers):
    """open_clip's SimpleTokenizer: its text cleaning (ftfy, HTML entities, whitespace, then `clean`: lower
    case, or punctuation removed as well for "canonicalize") before OpenAI's BPE, SOT ... EOT, 0-padding."""

    def __init__(self, path: str, clean: str = "lower"):
        from tokenizers import Regex, normalizers, pre_tokenizers
        from transformers import CLIPTokenizer

        if clean not in OPEN_CLIP_CLEAN:
            raise ValueError(f"tokenizer.clean={clean!r}; open_clip knows {OPEN_CLIP_CLEAN}")
        self.clean = clean
        sot, eot = "<start_of_text>", "<end_of_text>"  # open_clip 3's names of the two special tokens
        vocab, merges = clip_vocab_files(path, (sot, eot))
        tok = CLIPTokenizer(vocab, merges, unk_token=eot, bos_token=sot, eos_token=eot, pad_token=eot)
        # open_clip's `clean` decides the case (transformers' CLIPTokenizer always lower-cases), and its split
        # pattern ignores case
        backend = tok.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")])
        pattern = r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+)"
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        super().__init__(tok, lowercase=False, pad_id=0)

    def _clean(self, text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        if self.clean == "canonicalize":
            text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        text = " ".join(text.split())
        return text.lower() if self.clean == "lower" else text


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


def from_spec(spec) -> Tokenizer:
    """A tokenizer from the spec's tokenizer part (`models.spec.TokenizerSpec`, or its dict / config form):
    type, path, lowercase, pad_id, clean."""
    if dataclasses.is_dataclass(spec):
        spec = dataclasses.asdict(spec)
    kind, path, lowercase = spec["type"], spec.get("path", ""), spec.get("lowercase", True)
    if kind not in TYPES:
        raise ValueError(f"tokenizer.type={kind!r}; choose one of {TYPES}")
    if kind == "bytes":
        return ByteTokenizer(lowercase)
    if not path or not os.path.exists(path):
        hint = f" (the paper configs use T5's: a local copy of {T5_SENTENCEPIECE})" if kind == "sentencepiece" else ""
        raise FileNotFoundError(
            f"tokenizer.path={path!r} does not exist; {kind} needs a vocab file: "
            f"pass --config.tokenizer.path=FILE{hint}"
        )
    if kind == "big_vision":
        return BigVisionTokenizer(path, lowercase, spec.get("pad_id", 1))
    if kind == "open_clip":
        return OpenClipTokenizer(path, spec.get("clean", "lower"))
    if kind in ("hf", "clip_bpe"):
        cls = HFTokenizer if kind == "hf" else ClipBpeTokenizer
        return cls(path, lowercase, spec.get("pad_id", 0))
    cls = {"sentencepiece": SentencePieceTokenizer, "words": WordTokenizer}[kind]
    return cls(path, lowercase)


def tokenize(tokenizer: Tokenizer, texts: list[str], context_length: int) -> np.ndarray:
    """[N] strings -> [N, context_length] int32; long texts keep their first tokens and end in EOT."""
    out = np.full((len(texts), context_length), tokenizer.pad_id, np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) > context_length:
            ids = [*ids[: context_length - 1], tokenizer.eot_id]
        out[row, : len(ids)] = ids
    return out
