"""big_vision: random SigLIP checkpoints in big_vision's naming (scanned and unrolled) against the same weights in
transformers' SiglipModel, filled by a mapping written here from transformers' state-dict names (transformers 5 no
longer ships convert_siglip_to_hf.py; the mapping follows its rename table): embeddings, logits, hidden states,
tokenization, variants, tokenizer files, and bad files as one-line errors."""

import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

import cloc_jax  # noqa: E402
from cloc_jax import weights as convert  # noqa: E402
from cloc_jax.weights import big_vision  # noqa: E402
from tests.convert import reference  # noqa: E402

TOL = 1e-4
IMAGE = dict(width=48, depth=3, heads=4, mlp_dim=96, patch=8, side=32)
TEXT = dict(width=32, depth=2, heads=2, mlp_dim=80, vocab=300, length=16, embed=48)  # no image head: embed = 48
MU = dict(width=32, depth=1, heads=2, mlp_dim=128, patch=8, side=32)  # big_vision's "mu" variant
TEXTS = ["a photo of a cat", "Two RED dogs, left of the big square!", "", "a photo of " * 12]


def _random_checkpoint(image=IMAGE, text=TEXT, seed=0) -> dict[str, np.ndarray]:
    """big_vision's unrolled parameter names (no "params/" prefix), every value random: no zero or one."""
    rng = np.random.default_rng(seed)
    out = {}

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def dense(name, d_in, *d_out):
        out[f"{name}/kernel"] = normal(d_in, *d_out, scale=d_in**-0.5)
        out[f"{name}/bias"] = normal(*d_out, scale=0.1)

    def norm(name, d):
        out[f"{name}/scale"], out[f"{name}/bias"] = 1 + normal(d, scale=0.2), normal(d, scale=0.1)

    def attention(name, d, heads):
        for part in ("query", "key", "value"):
            dense(f"{name}/{part}", d, heads, d // heads)
        out[f"{name}/out/kernel"], out[f"{name}/out/bias"] = normal(heads, d // heads, d, scale=d**-0.5), normal(d)

    def mlp(name, d, hidden):
        dense(f"{name}/Dense_0", d, hidden)
        dense(f"{name}/Dense_1", hidden, d)

    def tower(name, sizes):
        d = sizes["width"]
        for i in range(sizes["depth"]):
            norm(f"{name}/encoderblock_{i}/LayerNorm_0", d)
            attention(f"{name}/encoderblock_{i}/MultiHeadDotProductAttention_0", d, sizes["heads"])
            norm(f"{name}/encoderblock_{i}/LayerNorm_1", d)
            mlp(f"{name}/encoderblock_{i}/MlpBlock_0", d, sizes["mlp_dim"])
        norm(f"{name}/encoder_norm", d)

    d, p, grid = image["width"], image["patch"], image["side"] // image["patch"]
    out["img/embedding/kernel"], out["img/embedding/bias"] = normal(p, p, 3, d, scale=(3 * p * p) ** -0.5), normal(d)
    out["img/pos_embedding"] = normal(1, grid * grid, d, scale=0.5)
    tower("img/Transformer", image)
    out["img/MAPHead_0/probe"] = normal(1, 1, d)
    attention("img/MAPHead_0/MultiHeadDotProductAttention_0", d, image["heads"])
    norm("img/MAPHead_0/LayerNorm_0", d)
    mlp("img/MAPHead_0/MlpBlock_0", d, image["mlp_dim"])
    out["txt/Embed_0/embedding"] = normal(text["vocab"], text["width"])
    out["txt/pos_embedding"] = normal(1, text["length"], text["width"], scale=0.5)
    tower("txt/Encoder_0", text)
    dense("txt/head", text["width"], text["embed"])
    out["t"], out["b"] = np.log([4.0], dtype=np.float32) + normal(1, scale=0.1), normal(1) - 3
    return out


def _save(folder, params, scanned=False, prefix="params/", stem="siglip", tokenizer=None) -> str:
    """An npz as big_vision writes it: flat "/" keys, the blocks stacked layers first when `scanned`."""
    os.makedirs(folder, exist_ok=True)
    out, stacks = {}, {}
    for key, value in params.items():
        match = re.match(r"^(.*)/encoderblock_(\d+)/(.*)$", key)
        if scanned and match:
            stacks.setdefault(f"{match[1]}/encoderblock/{match[3]}", {})[int(match[2])] = value
        else:
            out[key] = value
    out.update({key: np.stack([layers[i] for i in sorted(layers)]) for key, layers in stacks.items()})
    path = os.path.join(folder, f"{stem}.npz")
    np.savez(path, **{prefix + key: value for key, value in out.items()})
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(folder, f"{stem}.model"))
    return str(path)


def _transformers_state(p, image=IMAGE, text=TEXT) -> dict:
    """big_vision names -> SiglipModel's state dict (torch Linear is [out, in]; the MAP head fuses q, k, v)."""
    state = {}
    v, t = "vision_model", "text_model"

    def linear(src, dst, d):
        state[f"{dst}.weight"] = p[f"{src}/kernel"].reshape(d, -1).T
        state[f"{dst}.bias"] = p[f"{src}/bias"].reshape(-1)

    def norm(src, dst):
        state[f"{dst}.weight"], state[f"{dst}.bias"] = p[f"{src}/scale"], p[f"{src}/bias"]

    def mlp(src, dst, sizes):
        linear(f"{src}/Dense_0", f"{dst}.fc1", sizes["width"])
        linear(f"{src}/Dense_1", f"{dst}.fc2", sizes["mlp_dim"])

    def out_proj(src, dst, d):
        state[f"{dst}.weight"], state[f"{dst}.bias"] = p[f"{src}/kernel"].reshape(-1, d).T, p[f"{src}/bias"]

    def tower(src, dst, sizes):
        d = sizes["width"]
        for i in range(sizes["depth"]):
            s, o = f"{src}/encoderblock_{i}", f"{dst}.encoder.layers.{i}"
            norm(f"{s}/LayerNorm_0", f"{o}.layer_norm1")
            norm(f"{s}/LayerNorm_1", f"{o}.layer_norm2")
            for theirs, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                linear(f"{s}/MultiHeadDotProductAttention_0/{theirs}", f"{o}.self_attn.{ours}", d)
            out_proj(f"{s}/MultiHeadDotProductAttention_0/out", f"{o}.self_attn.out_proj", d)
            mlp(f"{s}/MlpBlock_0", f"{o}.mlp", sizes)

    d = image["width"]
    state[f"{v}.embeddings.patch_embedding.weight"] = p["img/embedding/kernel"].transpose(3, 2, 0, 1)
    state[f"{v}.embeddings.patch_embedding.bias"] = p["img/embedding/bias"]
    state[f"{v}.embeddings.position_embedding.weight"] = p["img/pos_embedding"][0]
    tower("img/Transformer", v, image)
    norm("img/Transformer/encoder_norm", f"{v}.post_layernorm")
    head = "img/MAPHead_0/MultiHeadDotProductAttention_0"
    state[f"{v}.head.probe"] = p["img/MAPHead_0/probe"]
    state[f"{v}.head.attention.in_proj_weight"] = np.concatenate(
        [p[f"{head}/{n}/kernel"].reshape(d, -1).T for n in ("query", "key", "value")]
    )
    state[f"{v}.head.attention.in_proj_bias"] = np.concatenate(
        [p[f"{head}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
    )
    out_proj(f"{head}/out", f"{v}.head.attention.out_proj", d)
    norm("img/MAPHead_0/LayerNorm_0", f"{v}.head.layernorm")
    mlp("img/MAPHead_0/MlpBlock_0", f"{v}.head.mlp", image)
    state[f"{t}.embeddings.token_embedding.weight"] = p["txt/Embed_0/embedding"]
    state[f"{t}.embeddings.position_embedding.weight"] = p["txt/pos_embedding"][0]
    tower("txt/Encoder_0", t, text)
    norm("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
    linear("txt/head", f"{t}.head", text["width"])
    state["logit_scale"], state["logit_bias"] = p["t"], p["b"]
    return {key: torch.tensor(np.ascontiguousarray(value)) for key, value in state.items()}


def _transformers_model(params, image=IMAGE, text=TEXT):
    layers = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=text["vocab"], hidden_size=text["width"], intermediate_size=text["mlp_dim"],
            num_hidden_layers=text["depth"], num_attention_heads=text["heads"], max_position_embeddings=text["length"],
            projection_size=text["embed"], pad_token_id=1, eos_token_id=1, bos_token_id=None, **layers,
        ),
        vision_config=dict(
            hidden_size=image["width"], intermediate_size=image["mlp_dim"], num_hidden_layers=image["depth"],
            num_attention_heads=image["heads"], image_size=image["side"], patch_size=image["patch"], **layers,
        ),
    )  # fmt: skip
    model = transformers.SiglipModel(config).eval()
    model.load_state_dict(_transformers_state(params, image, text), strict=True)
    return model


def _big_vision_ids(sp, texts, length, pad):
    """big_vision's pp `tokenize(max_len, eos="sticky", pad_value=...)`: lower-cased, EOS appended, EOS kept last
    when cut, padded."""
    rows = []
    for text in texts:
        ids = [*sp.encode(text.lower()), sp.eos_id()]
        ids = [*ids[: length - 1], ids[-1]] if len(ids) >= length else ids
        rows.append(ids + [pad] * (length - len(ids)))
    return np.array(rows, np.int32)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return reference.sentencepiece_model(str(tmp_path_factory.mktemp("spm")))


@pytest.fixture(scope="module")
def params():
    return _random_checkpoint()


@pytest.fixture(scope="module")
def files(params, spm, tmp_path_factory):
    root = tmp_path_factory.mktemp("big_vision")
    return {
        "scanned": _save(root / "scanned", params, scanned=True, tokenizer=spm),
        "unrolled": _save(root / "unrolled", params, prefix="", tokenizer=spm),
        "unrolled_prefixed": _save(root / "unrolled_prefixed", params, tokenizer=spm),
    }


@pytest.fixture(scope="module")
def hf_model(params):
    return _transformers_model(params)


@pytest.fixture(scope="module")
def encoders(files):
    scanned = cloc_jax.load(f"big_vision:{files['scanned']}", scan=True)
    return {True: scanned, False: cloc_jax.load(f"big_vision:{files['unrolled']}", scan=False)}


def _images(n=3, side=32, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


def _reference(model, images, ids):
    """transformers' outputs: unit image and text embeddings, logits [B, N], vision hidden states."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=reference.siglip_pixels(images))
        hidden = model.vision_model(pixel_values=reference.siglip_pixels(images), output_hidden_states=True)
    unit = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    return unit(out.image_embeds), unit(out.text_embeds), out.logits_per_image.numpy(), hidden.hidden_states


@pytest.mark.parametrize("scan", [True, False])
def test_matches_transformers(encoders, hf_model, scan):
    encoder, images = encoders[scan], _images()
    assert encoder.spec.model.scan is scan
    ids = np.random.default_rng(2).integers(0, TEXT["vocab"], (4, TEXT["length"])).astype(np.int32)
    zimg, ztxt, logits, hidden = _reference(hf_model, images, ids)
    errors = {
        "image": np.abs(encoder.encode_image(images) - zimg).max(),
        "text": np.abs(encoder.encode_text(ids) - ztxt).max(),
        "logits": np.abs(encoder.logits(images, ids) - logits).max(),
    }
    errors["hidden[-2]"] = np.abs(encoder.image_features(images, layer=-2) - hidden[-2].numpy()).max()
    print(f"scan={scan}", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors
    scale, bias = encoder._logit_params(encoder.params)  # exp(t) and b as they are: no clamp
    assert np.isclose(float(scale), hf_model.logit_scale.exp().item())
    assert np.isclose(float(bias), hf_model.logit_bias.item())


def test_texts_match_transformers(encoders, hf_model, spm):
    """Strings through the loaded tokenizer give the ids of big_vision's pp op (written out in this file) and the
    text embeddings transformers computes from those ids."""
    encoder = encoders[True]
    sp = sentencepiece.SentencePieceProcessor(model_file=spm)
    spec = encoder.spec.tokenizer
    assert (spec.type, spec.pad_id, spec.lowercase) == ("big_vision", sp.eos_id(), True)
    ids = _big_vision_ids(sp, TEXTS, TEXT["length"], pad=sp.eos_id())
    assert ids[-1, -1] == sp.eos_id() and len(sp.encode(TEXTS[-1])) > TEXT["length"]  # one text is cut
    np.testing.assert_array_equal(encoder.tokenize(TEXTS), ids)
    _, ztxt, _, _ = _reference(hf_model, _images(1), ids)
    error = np.abs(encoder.encode_text(TEXTS) - ztxt).max()
    print("strings", f"{error:.2e}")
    assert error <= TOL


def test_layouts_and_prefixes_read_alike(files):
    first, *others = (big_vision.read(path) for path in files.values())  # what convert.read checks
    spec = first.spec.to_json()
    model, sizes = spec["model"], ("width", "depth", "heads", "mlp_dim")
    assert (spec["image_size"], model["embed_dim"], model["image"]["project"]) == (IMAGE["side"], TEXT["embed"], False)
    assert {k: model["image"][k] for k in sizes} == {k: IMAGE[k] for k in sizes}
    assert {k: model["text"][k] for k in sizes} == {k: TEXT[k] for k in sizes}
    assert model["image"]["posemb_grid"] == IMAGE["side"] // IMAGE["patch"]
    assert model["text"]["vocab_size"] == TEXT["vocab"]
    for other in others:
        assert other.params.keys() == first.params.keys()
        for key, value in first.params.items():
            np.testing.assert_array_equal(value, other.params[key], err_msg=key)
        assert other.spec.replace(**{"tokenizer.path": spec["tokenizer"]["path"]}) == first.spec


def test_image_head_projects_with_bias(params, hf_model, spm, tmp_path):
    """An `img/head` (a Dense with bias after the MAP head) becomes the image projection."""
    rng = np.random.default_rng(3)
    edited = dict(params)
    edited["img/head/kernel"] = rng.standard_normal((48, 40)).astype(np.float32) / 7
    edited["img/head/bias"] = rng.standard_normal(40).astype(np.float32) / 10
    edited["txt/head/kernel"] = rng.standard_normal((32, 40)).astype(np.float32) / 6
    edited["txt/head/bias"] = rng.standard_normal(40).astype(np.float32) / 10
    encoder = cloc_jax.load(f"big_vision:{_save(tmp_path, edited, scanned=True, tokenizer=spm)}")
    image = encoder.spec.model.image
    assert (image.project, image.proj_bias, encoder.spec.model.embed_dim) == (True, True, 40)
    images = _images()
    with torch.no_grad():
        pooled = hf_model.vision_model(pixel_values=reference.siglip_pixels(images)).pooler_output.numpy()
    want = pooled @ edited["img/head/kernel"] + edited["img/head/bias"]
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    error = np.abs(encoder.encode_image(images) - want).max()
    print("image head", f"{error:.2e}")
    assert error <= TOL


@pytest.fixture(scope="module")
def mu_params():
    return _random_checkpoint(MU, dict(TEXT, embed=32), seed=4)


def test_variant_checks_the_shapes(mu_params, spm, tmp_path):
    path = _save(tmp_path, mu_params, tokenizer=spm)
    for variant in ("mu", "mu/8/32", "mu/8-i18n"):
        spec = big_vision.read(f"{path}:{variant}").spec
        assert (spec.image_size, spec.model.image.variant) == (32, "mu/8")
    for variant, says in (("B/16", "width=768"), ("mu/16", "patch=16"), ("mu/8/64", "image_size=64")):
        with pytest.raises(ValueError) as error:
            convert.read(f"big_vision:{path}:{variant}")
        assert path in _one_line(error) and says in str(error.value), error.value
    for variant in ("XL/8", "mu/eight", "mu/8/32/1"):
        with pytest.raises(ValueError, match="unknown big_vision variant") as error:
            convert.read(f"big_vision:{path}:{variant}")
        _one_line(error)


def _remove(name):
    return lambda p: [p.pop(k) for k in list(p) if k.endswith(name)]


def _reshape_scale(p):
    for key in [k for k in p if re.search(r"img/Transformer/encoderblock_\d+/LayerNorm_1/scale$", k)]:
        p[key] = np.concatenate([p[key], p[key][:1]])


_BLOCK_CASES = [  # the file's layout changes how a block parameter is named: both layouts
    (_remove("encoderblock_1/MlpBlock_0/Dense_1/bias"), r"missing parameter params/img/Transformer/encoderblock"),
    (lambda p: p.update({"txt/Encoder_0/encoderblock_0/Extra/kernel": p["t"]}), r"unexpected parameter params/txt"),
    (_reshape_scale, r"params/img/Transformer/encoderblock(_0|/LayerNorm_1/scale\[0\]).* has shape \(49,\)"),
]
_OTHER_CASES = [
    (_remove("txt/Encoder_0/encoder_norm/bias"), r"missing parameter params/txt/Encoder_0/encoder_norm/bias"),
    (_remove("MAPHead_0/MlpBlock_0/Dense_1/bias"), r"missing parameter params/img/MAPHead_0/MlpBlock_0/Dense_1/b"),
    (lambda p: p.update({"img/MAPHead_0/Dense_9/kernel": p["t"]}), r"unexpected parameter params/img/MAPHead_0/D"),
    (lambda p: p.update({"txt/head/kernel": p["txt/head/kernel"][:, :40]}), r"has no head, .*txt/head/kernel"),
    (lambda p: p.update({"img/pos_embedding": p["img/pos_embedding"][:, :15]}), r"img/pos_embedding has shape"),
]


@pytest.mark.parametrize(
    "edit, says, scanned",
    [(*case, scanned) for case in _BLOCK_CASES for scanned in (True, False)]
    + [(*case, i % 2 == 0) for i, case in enumerate(_OTHER_CASES)],
)
def test_bad_checkpoints_are_one_line_errors(params, spm, tmp_path, scanned, edit, says):
    edited = dict(params)
    edit(edited)
    path = _save(tmp_path, edited, scanned=scanned, tokenizer=spm)
    with pytest.raises(ValueError) as error:
        cloc_jax.load(f"big_vision:{path}")
    assert _one_line(error).startswith(path) and re.search(says, str(error.value)), error.value


def _gemma_like_spm(folder) -> str:
    """A SentencePiece model laid out as Gemma's (pad 0, EOS 1, BOS 2, UNK 3): SigLIP 2's tokenizer."""
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(["a photo of a red circle", "two dogs left of a blue square", "a small green star"] * 50))
    prefix = os.path.join(folder, "gemma")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, minloglevel=2, vocab_size=29, pad_id=0, eos_id=1, bos_id=2, unk_id=3
    )
    return prefix + ".model"


def test_tokenizer_file_beside_the_npz(mu_params, spm, tmp_path):
    path = _save(tmp_path / "none", mu_params)
    with pytest.raises(FileNotFoundError, match=r"siglip\.model") as error:
        convert.read(f"big_vision:{path}")
    assert path in _one_line(error)
    shutil.copy(spm, tmp_path / "none" / "other.model")  # the folder's only .model file
    assert big_vision.read(path).spec.tokenizer.path.endswith("other.model")
    shutil.copy(spm, tmp_path / "none" / "third.model")
    with pytest.raises(FileNotFoundError, match="found 2"):
        convert.read(f"big_vision:{path}")
    shutil.copy(_gemma_like_spm(str(tmp_path)), tmp_path / "none" / "siglip.model")  # the same stem wins
    tok = big_vision.read(path).spec.tokenizer
    assert tok.path.endswith("siglip.model") and tok.pad_id == 0  # SigLIP 2 pads with Gemma's pad token
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert.read(f"big_vision:{tmp_path}/missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an npz of big_vision parameters"):
        convert.read(f"big_vision:{tmp_path}/text.npz")
