"""Tiny randomly initialised transformers CLIP and SigLIP models, saved as real checkpoints are (config, weights,
tokenizer and image-processor files), with every parameter moved away from its initial value so a wrong bias
or norm mapping cannot hide behind a zero or a one."""

import os
import tempfile

import numpy as np

OPENAI_BPE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def open_clip_bpe() -> str:
    """OpenAI's real BPE merges, shipped inside the open_clip wheel (located without importing open_clip)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        import pytest

        pytest.skip("open_clip_torch is not installed (it ships OpenAI's BPE vocabulary)")
    return os.path.join(spec.submodule_search_locations[0], OPENAI_BPE)


def perturb(model, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_clip(directory: str, act: str = "quick_gelu", side: int = 32) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from cloc_jax.tokenizers import clip_vocab_files

    layers = dict(intermediate_size=80, hidden_act=act)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **layers),
        vision_config=dict(
            hidden_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=side, patch_size=8, **layers
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)  # the same tiny CLIP every run: tests that train from it are not at the mercy of its draw
    perturb(CLIPModel(config)).save_pretrained(directory)
    CLIPTokenizer(*clip_vocab_files(open_clip_bpe())).save_pretrained(directory)  # OpenAI's vocabulary
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory
    )
    return directory


def sentencepiece_model(directory: str) -> str:
    """A small SentencePiece model laid out as SigLIP's (pad 0, EOS 1, UNK 2)."""
    import sentencepiece

    corpus = os.path.join(directory, "corpus.txt")
    words = ["a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "star", "dog", "cat"]
    words += ["left", "right", "above", "below", "big", "small", "two"]
    rng = np.random.default_rng(0)
    with open(corpus, "w") as f:
        f.write("\n".join(" ".join(rng.choice(words, 6)) for _ in range(400)))
    prefix = os.path.join(directory, "spiece")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, minloglevel=2, vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    return prefix + ".model"


def save_siglip(directory: str, side: int = 32) -> str:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    os.makedirs(directory, exist_ok=True)
    spm = sentencepiece_model(tempfile.mkdtemp())
    layers = dict(intermediate_size=80, hidden_size=48, num_attention_heads=3)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=40, num_hidden_layers=2, max_position_embeddings=16, pad_token_id=1, eos_token_id=1, **layers
        ),
        vision_config=dict(num_hidden_layers=3, image_size=side, patch_size=8, **layers),
    )
    perturb(SiglipModel(config)).save_pretrained(directory)
    SiglipTokenizer(vocab_file=spm, model_max_length=16).save_pretrained(directory)
    SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(directory)
    return directory


def clip_pixels(images: np.ndarray):
    """[B, H, W, 3] in [-1, 1] -> what CLIPImageProcessor gives transformers: [B, 3, H, W], CLIP mean/std."""
    import torch

    return torch.tensor((((images + 1) / 2 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2), dtype=torch.float32)


def siglip_pixels(images: np.ndarray):
    import torch

    return torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float32)  # SigLIP: mean = std = 0.5
