"""open_clip: hub folders against open_clip itself (tiny CLIPs built from its own model code, every parameter
perturbed): embeddings, logits, hidden states, tokenizer ids, exports back to open_clip, and bad folders as
one-line errors."""

import copy
import gzip
import json
import os
import random

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

import cloc_jax  # noqa: E402
from cloc_jax import weights as convert  # noqa: E402
from cloc_jax.convert import convert as convert_to  # noqa: E402
from cloc_jax.models.build import build_with_tokenizer  # noqa: E402
from cloc_jax.models.spec import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from cloc_jax.tokenizers import tokenize  # noqa: E402
from cloc_jax.weights import open_clip as oc  # noqa: E402
from cloc_jax.weights.layout import Weights  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of a cat", "Two DOGS &amp; a bird!", "", "word " * 100]
TOWERS = dict(
    vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)
# OpenAI's ViT (QuickGELU) and one with every other setting we read turned away from its default.
VARIANTS = {
    "quick_gelu": (dict(embed_dim=16, quick_gelu=True, **TOWERS), {}),
    "gelu": (
        dict(
            embed_dim=16,
            init_logit_bias=-3.0,
            vision_cfg=dict(TOWERS["vision_cfg"], no_ln_pre=True, final_ln_after_pool=True, mlp_ratio=3.0,
                            norm_kwargs={"eps": 1e-6}, patch_dropout=0.5),
            text_cfg=dict(TOWERS["text_cfg"], no_causal_mask=True, pool_type="last", proj_bias=True, mlp_ratio=2.5,
                          norm_kwargs={"eps": 1e-6}),
        ),
        dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]),
    ),
}  # fmt: skip


def _build(model_cfg: dict, seed: int = 0):
    """open_clip's CLIP from a model config, every parameter moved off its init (norm scales off one, biases off
    zero), in eval mode (no patch dropout)."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _save(directory, model_cfg: dict, preprocess: dict, weights: str = oc.WEIGHTS[0], state=None) -> str:
    """The hub layout: open_clip_config.json + the weights file."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, oc.CONFIG), "w") as f:
        json.dump(dict(model_cfg=model_cfg, preprocess_cfg=preprocess), f)
    state = {k: v.contiguous() for k, v in (_build(model_cfg).state_dict() if state is None else state).items()}
    if weights.endswith(".safetensors"):
        save_file(state, os.path.join(directory, weights))
    else:
        torch.save(state, os.path.join(directory, weights))
    return str(directory)


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory):
    cfg, preprocess = VARIANTS[request.param]
    return _save(tmp_path_factory.mktemp(request.param), cfg, preprocess)


def _images(n=2, side=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


def _reference(model, preprocess: dict, images, texts):
    """open_clip's own outputs: (image embeddings, text embeddings, logits [B, N], the last resblock's input)."""
    mean = np.array(preprocess.get("mean", OPENAI_MEAN), np.float32)
    std = np.array(preprocess.get("std", OPENAI_STD), np.float32)
    pixels = torch.tensor((((images + 1) / 2 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)(texts)
    seen = []
    blocks = model.visual.transformer
    hook = blocks.resblocks[-1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        zimg, ztxt = model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)
        logits = model.logit_scale.exp() * zimg @ ztxt.T
        if model.logit_bias is not None:
            logits += model.logit_bias
    hook.remove()
    hidden = seen[0] if blocks.batch_first else seen[0].transpose(0, 1)  # [B, 1 + grid², width]
    return zimg.numpy(), ztxt.numpy(), logits.numpy(), hidden.numpy()


def _compare(encoder, model, preprocess: dict, name: str):
    images = _images()
    zimg, ztxt, logits, hidden = _reference(model, preprocess, images, TEXTS)
    errors = {
        "image": np.abs(encoder.encode_image(images) - zimg).max(),
        "text": np.abs(encoder.encode_text(TEXTS) - ztxt).max(),
        "logits": np.abs(encoder.logits(images, TEXTS) - logits).max(),
        "hidden[-2]": np.abs(encoder.image_features(images, layer=-2) - hidden).max(),
    }
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors


def _variant(folder):
    return os.path.basename(folder.rstrip("/")).rstrip("0123456789")


@pytest.mark.parametrize("scan", [True, False])
def test_matches_open_clip(folder, scan):
    cfg, preprocess = VARIANTS[_variant(folder)]
    encoder = cloc_jax.load(f"open_clip:{folder}", scan=scan)
    assert encoder.spec.model.scan is scan
    assert encoder.spec.model.loss == ("sigmoid" if "init_logit_bias" in cfg else "softmax")
    _compare(encoder, _build(cfg), preprocess, f"{_variant(folder)} scan={scan}")


def test_torch_pickle_and_custom_text_layout(tmp_path):
    """open_clip_pytorch_model.bin, and CustomTextCLIP's `text.` names (SigLIP-style configs), give the parameters
    the safetensors file of the same model gives."""
    cfg, preprocess = VARIANTS["quick_gelu"]
    state = _build(cfg).state_dict()
    text = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    custom = {("text." + k if k.startswith(text) else k): v for k, v in state.items()}
    want = convert.read(f"open_clip:{_save(tmp_path / 'safetensors', cfg, preprocess)}").params
    for folder in (
        _save(tmp_path / "bin", cfg, preprocess, weights=oc.WEIGHTS[1]),
        _save(tmp_path / "custom", dict(cfg, custom_text=True), preprocess, state=custom),
    ):
        have = convert.read(f"open_clip:{folder}").params
        assert have.keys() == want.keys() and all(np.array_equal(have[k], want[k]) for k in want)


def _texts(n=300, seed=0):
    """Deterministic awkward strings: punctuation, case, unicode, HTML entities, whitespace, numbers, long."""
    pieces = ["a photo of", "DOG", "cat's", "don't", "&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "naïve",
              "café", "漢字", "😀", "→", "ﬁ", "Ünïcödé", "x²", "1,000.5", "--", "!?", "...", "(parens)", "[b]",
              "e-mail", "snake_case", "CamelCase", "\t", "\n", "  ", "ß", "İ", "ﬀ", "Ａ", "a-b/c", "@user", "#tag",
              "$5", "100%", "isn't", "they'll", "we're", "I'M", "don’t", "Ｈｅｌｌｏ", "\u00a0",
              "mojibake: Ã©"]  # fmt: skip
    rng = random.Random(seed)
    texts = ["", " ", "a", "word " * 100, "&amp;amp;", "   leading and trailing   "]
    while len(texts) < n:
        texts.append(rng.choice(["", " "]).join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return texts


# open_clip keeps case with clean="whitespace", splits case-insensitively and names its specials <end_of_text>
SPECIAL = ["<end_of_text>", "a <|endoftext|> b", "<start_of_text>x", "A <END_OF_TEXT> b"]


@pytest.mark.parametrize(
    "clean, texts",
    [
        ("lower", _texts(240)),
        ("canonicalize", _texts(60, seed=1)),
        ("whitespace", _texts(60, seed=2)),
        ("lower", SPECIAL),
    ],
    ids=["lower", "canonicalize", "whitespace", "special_tokens"],
)
def test_tokenizer_ids_match_open_clip(tmp_path, clean, texts):
    cfg, _ = VARIANTS["quick_gelu"]
    text_cfg = dict(cfg["text_cfg"], tokenizer_kwargs={"clean": clean})
    spec = oc._architecture(dict(model_cfg=dict(cfg, text_cfg=text_cfg)), "test")
    spec = spec.replace(**{"tokenizer.path": oc._bpe(str(tmp_path))})  # the installed open_clip's BPE
    tokenizer, _ = build_with_tokenizer(spec)
    ours = tokenize(tokenizer, texts, 77)
    theirs = open_clip.tokenizer.SimpleTokenizer(clean=clean)(texts).numpy()
    bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not np.array_equal(a, b)]
    print(clean, f"{len(texts) - len(bad)}/{len(texts)} equal")
    assert not bad, bad[:3]


def test_write_loads_in_open_clip_and_round_trips(folder, tmp_path):
    """import -> open_clip folder: open_clip computes what it computed before; import -> export -> import and
    import -> open_clip folder -> import give bit-identical parameters."""
    cfg, preprocess = VARIANTS[_variant(folder)]
    weights = convert.read(f"open_clip:{folder}")
    tokenizer, _ = build_with_tokenizer(weights.spec)
    out = oc.write(weights, tokenizer, str(tmp_path / "out"))
    assert not [f for f in os.listdir(out) if f.endswith(".gz")]  # open_clip's own BPE is not copied
    written = open_clip.create_model("local-dir:" + out).eval()
    with open(os.path.join(out, oc.CONFIG)) as f:
        written_preprocess = json.load(f)["preprocess_cfg"]
    assert np.allclose(written_preprocess["mean"], preprocess.get("mean", OPENAI_MEAN))
    images = _images(seed=1)
    want = _reference(_build(cfg), preprocess, images, TEXTS)
    have = _reference(written, written_preprocess, images, TEXTS)
    errors = [float(np.abs(a - b).max()) for a, b in zip(want, have, strict=True)]
    print("open_clip before/after export", [f"{e:.2e}" for e in errors])
    assert max(errors) <= TOL, errors
    again = convert.read(f"open_clip:{out}")
    export = convert_to(f"open_clip:{folder}", str(tmp_path / "export"))
    for other in (again, convert.read(export)):
        params = other.in_layout(scan=False)
        assert params.keys() == weights.params.keys()
        assert all(np.array_equal(params[k], weights.params[k]) for k in weights.params)
    assert again.spec == weights.spec


@pytest.mark.parametrize("folder", ["quick_gelu"], indirect=True)
def test_write_copies_a_foreign_bpe(folder, tmp_path):
    """A BPE file that is not open_clip's own travels with the folder, and the reader picks it up."""
    weights = convert.read(f"open_clip:{folder}")
    bpe = tmp_path / "my_merges.txt.gz"
    with gzip.open(weights.spec.tokenizer.path) as f, gzip.open(bpe, "wb", compresslevel=1) as g:
        g.write(f.read())  # the same merges in other bytes
    spec = weights.spec.replace(**{"tokenizer.path": str(bpe)})
    tokenizer, _ = build_with_tokenizer(spec)
    out = oc.write(Weights(spec, weights.params, folder), tokenizer, str(tmp_path / "out"))
    assert convert.read(f"open_clip:{out}").spec.tokenizer.path == os.path.join(out, bpe.name)


def _edit(folder, tmp_path, cfg=None, state=None):
    """A copy of `folder` with its model config and/or state dict replaced."""
    with open(os.path.join(folder, oc.CONFIG)) as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, oc.WEIGHTS[0])) if state is None else state
    return _save(tmp_path, config["model_cfg"] if cfg is None else cfg, config["preprocess_cfg"], state=state)


def test_bad_folders_are_one_line_errors(tmp_path, monkeypatch):
    cfg, preprocess = VARIANTS["quick_gelu"]
    good = _save(tmp_path / "good", cfg, preprocess)
    state = load_file(os.path.join(good, oc.WEIGHTS[0]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=oc.CONFIG):
        convert.read(f"open_clip:{empty}")
    (empty / oc.CONFIG).write_text(json.dumps(dict(model_cfg=cfg)))
    with pytest.raises(FileNotFoundError, match=oc.WEIGHTS[0]):
        convert.read(f"open_clip:{empty}")
    monkeypatch.setattr(oc, "default_bpe", lambda: None)  # open_clip not installed, no BPE in the folder
    with pytest.raises(FileNotFoundError, match=f"no BPE merges file \\({oc.BPE}\\).*pip install open_clip_torch"):
        convert.read(f"open_clip:{good}")
    monkeypatch.undo()
    extra = _edit(good, tmp_path / "extra", state=dict(state, **{"visual.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors: unexpected parameter visual\.extra_head"):
        convert.read(f"open_clip:{extra}")
    missing = _edit(good, tmp_path / "missing", state={k: v for k, v in state.items() if k != "ln_final.bias"})
    with pytest.raises(ValueError, match=r"missing parameter ln_final\.bias"):
        convert.read(f"open_clip:{missing}")
    shape = _edit(good, tmp_path / "shape", state=dict(state, **{"visual.proj": torch.zeros(64, 8)}))
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors: visual\.proj has shape \(64, 8\)"):
        convert.read(f"open_clip:{shape}")
    settings = [
        ("vision_cfg", "ls_init_value", 1e-5),
        ("text_cfg", "ls_init_value", 1e-5),
        ("vision_cfg", "pool_type", "avg"),
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("text_cfg", "embed_cls", True),
        ("vision_cfg", "qk_norm", True),
        ("vision_cfg", "input_patchnorm", True),
        ("text_cfg", "pool_type", "first"),
    ]
    for tower, key, value in settings:
        bad = dict(cfg, **{tower: dict(cfg[tower], **{key: value})})
        with pytest.raises(ValueError, match=rf"open_clip_config\.json: {tower}\.{key}"):
            convert.read(f"open_clip:{_edit(good, tmp_path / f'{tower}_{key}', cfg=bad, state=state)}")
    with pytest.raises(ValueError, match=r"model_cfg\.multimodal_cfg"):
        convert.read(f"open_clip:{_edit(good, tmp_path / 'coca', cfg=dict(cfg, multimodal_cfg={}), state=state)}")


def test_activation_and_norm_settings_round_trip(tmp_path):
    """act_kwargs (GELU's tanh approximation) and norm_kwargs (eps) read into the spec and write back; the towers
    must agree on them."""
    cfg, _ = VARIANTS["quick_gelu"]
    tanh = dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
    towers = {tower: dict(cfg[tower], **tanh) for tower in ("vision_cfg", "text_cfg")}
    cfg = dict(cfg, quick_gelu=False, **towers)
    spec = oc._architecture(dict(model_cfg=cfg), "cfg.json")
    assert (spec.model.activation, spec.model.ln_eps) == ("gelu_tanh", 1e-6)
    params = {"image/pos_embedding": np.zeros((4, 4, 64)), "text/pos_embedding": np.zeros((77, 32))}
    params["text/token_embed/embedding"] = np.zeros((49408, 32))
    written = oc.model_config(spec, params)
    assert written["vision_cfg"] == dict(cfg["vision_cfg"], mlp_ratio=4.0)
    assert written["text_cfg"] == dict(cfg["text_cfg"], mlp_ratio=4.0) and not written["quick_gelu"]
    model = open_clip.model.CLIP(**written)  # open_clip builds it: tanh GELU, eps 1e-6
    assert model.visual.transformer.resblocks[0].mlp.gelu.approximate == "tanh"
    assert model.transformer.resblocks[0].ln_1.eps == 1e-6
    for tower in ("vision_cfg", "text_cfg"):
        other = dict(cfg, **{tower: dict(cfg[tower], act_kwargs=None)})
        with pytest.raises(ValueError, match="the towers differ in act_kwargs"):
            oc._architecture(dict(model_cfg=other), "cfg.json")
    with pytest.raises(ValueError, match=r"vision_cfg\.act_kwargs"):
        oc._architecture(dict(model_cfg=dict(cfg, quick_gelu=True)), "cfg.json")


@pytest.mark.parametrize("folder", ["gelu"], indirect=True)
def test_unexpressible_specs_are_one_line_errors(folder, tmp_path):
    weights = convert.read(f"open_clip:{folder}")
    tokenizer, _ = build_with_tokenizer(weights.spec)
    for key, value in [("image.pool", "map"), ("image.patch_bias", True), ("image.adapter_dim", 8),
                       ("image.proj_bias", True), ("activation", "relu")]:  # fmt: skip
        spec = weights.spec.replace(**{f"model.{key}": value})
        with pytest.raises(ValueError, match=rf"model\.{key}={value!r}"):
            oc.write(Weights(spec, weights.params, folder), tokenizer, str(tmp_path / "out"))
    spec = weights.spec.replace(**{"tokenizer.type": "bytes", "tokenizer.path": ""})
    with pytest.raises(ValueError, match=r"tokenizer\.type='bytes'"):
        oc.write(Weights(spec, weights.params, folder), tokenizer, str(tmp_path / "out"))
