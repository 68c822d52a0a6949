"""Training-step throughput of cloc_jax beside big_vision and open_clip, same CLIP, one run (same-run ratios).

    git --git-dir=/work/.mirror/google-research+big_vision/repo worktree add --detach /tmp/big_vision HEAD
    python bench/peers.py --big_vision=/tmp/big_vision [--steps=3 --rounds=2 --ours=model.scan=True,...]

One CLIP four ways: image ViT-B/16 at 224 px, text 12 layers x 512 wide (8 heads, MLP 2048, 77 tokens),
embedding 512, our config's vocabulary (printed), float32, softmax CLIP loss, AdamW (lr 5e-4, b2 0.98,
eps 1e-6, wd 0.2, gradients clipped to norm 1), batch 16, the same batch every step:

  ours        configs/clip_b16.py:data=scenes in the CPU layout bench/step.py runs (float32, no remat, layers
              unrolled), optim.name=adamw, then the --ours overrides (model.scan=True: scanned layers);
              bench/common.py's real batch, step and FLOP count, as bench/step.py.
  big_vision  two_towers.Model (vit B/16, pool_type "map"; text_transformer) imported from the --big_vision
              checkout, nothing copied, image head_zeroinit=False as its image-text configs set (a zero head
              gives NaN gradients through the norm of 0); a jitted step like trainers/proj/image_text/
              siglip.py (value_and_grad, optax update, l2 norms of grads/params/updates) with the softmax
              loss and optax AdamW. big_vision.utils imports tensorflow.io.gfile, which only reads and writes
              checkpoints: without tensorflow it is an empty stub module in sys.modules (after importing
              flax.training.checkpoints, whose flax.io probes for tensorflow with find_spec).
  open_clip   open_clip.CLIP from ViT-B-16's own config with the text vocabulary set to ours; torch with 2
              threads, a loop like open_clip's train_one_epoch: forward, open_clip.loss.ClipLoss, backward,
              clip_grad_norm_, torch.optim.AdamW (torch's default implementation), logit scale clamp.
  ours_cls    ours with model.image.pool=cls and model.activation=gelu: open_clip's architecture.

Each runs in its own subprocess, one after another (torch's and XLA's thread pools never overlap), for
--rounds interleaved rounds (A B C D A B C D): one warm-up step (compile), then --steps timed steps, median
seconds per step; reported is the median over rounds. Every step carries its state as training does (JAX:
donated, as common.step_runner and big_vision's trainer do; torch: in place), and every worker runs with
cloc_jax.cpu.keep_freed_memory (which bench/common.py sets for JAX on a CPU), one malloc setting for all.
JAX workers time a 4096^2 float32 matmul in the same process for MFU, with FLOPs from XLA's cost analysis
of the step with layers unrolled (ours: common.step_flops; big_vision's vit does not scan: its own step).

Not identical: big_vision's text tower is bidirectional and pools the last token (ours and open_clip's are
causal and pool the end-of-text token), its ViT has no pre-LayerNorm and its projections have biases;
open_clip pools a class token (no MAP head: ours_cls is the like-for-like pairing), uses exact GELU and
LayerNorm eps 1e-5; only ours and open_clip clamp the logit scale; weight-decay masks follow each
codebase's convention; open_clip runs no learning-rate schedule; ours reads the real scenes batch, the
peers a random one of the same shapes; our step also skips non-finite updates.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import types
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("ours", "big_vision", "open_clip", "ours_cls")
CLS_TWIN = ("model.image.pool=cls", "model.activation=gelu")
MARK = "PEER_RESULT "
WHAT = dict(
    ours="cloc_jax clip_b16 (MAP head, gelu_tanh), XLA",
    big_vision="big_vision two_towers (vit MAP head, text_transformer), XLA",
    open_clip="open_clip ViT-B-16 (class token, exact gelu), torch eager",
    ours_cls="cloc_jax clip_b16 with pool=cls, activation=gelu, XLA",
)
LR, B1, B2, EPS, WD, CLIP_NORM = 5e-4, 0.9, 0.98, 1e-6, 0.2, 1.0


def our_config(batch: int, overrides: list[str]):
    """configs/clip_b16.py:data=scenes in the CPU layout, AdamW, then `key=value` overrides (typed like the key)."""
    from common import CPU_LAYOUT, apply_overrides

    from cloc_jax.config import load_config_file, set_dotted

    config = load_config_file(os.path.join(ROOT, "configs", "clip_b16.py"), "data=scenes")
    settings = {f"model.{k}": v for k, v in CPU_LAYOUT.items()}
    settings.update({"optim.name": "adamw", "batch_size": batch})
    return apply_overrides(set_dotted(config, settings), overrides)


def our_vocab(overrides: list[str]) -> int:
    from cloc_jax.train import build

    return build(our_config(1, overrides))[1].text.vocab_size


def count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def run_ours(args, overrides: list[str]) -> dict:
    from common import matmul_peak_flops, median_seconds, real_batch, step_flops, step_runner

    from cloc_jax import sharding
    from cloc_jax.train import abstract_state, build

    config = our_config(args.batch, overrides)
    mesh = sharding.make_mesh(config.mesh)
    batch = real_batch(config, mesh)
    run, outs = step_runner(config, batch, mesh), []
    seconds = median_seconds(lambda: outs.append(run()) or outs[-1], args.steps)
    _, model, tx = build(config)
    out = dict(seconds=seconds, loss=float(outs[-1]["loss"]), vocab=model.text.vocab_size, overrides=overrides)
    out.update(params=count(abstract_state(config, model, tx, mesh)[1].params), peak=matmul_peak_flops())
    return dict(out, flops=step_flops(config) if args.flops else None)


def big_vision_step(path: str, vocab: int, batch: int, warmup: int = 2000):
    """(jitted step(state, rng, batch) -> (state, measurements), state, rng, batch) of big_vision's two towers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sys.path.insert(0, os.path.abspath(path))
    if importlib.util.find_spec("tensorflow") is None:  # see the docstring: gfile only loads checkpoints
        import flax.training.checkpoints  # noqa: F401  (flax.io's find_spec("tensorflow") before the stub)

        sys.modules.update({n: types.ModuleType(n) for n in ("tensorflow", "tensorflow.io", "tensorflow.io.gfile")})
    from big_vision.models.proj.image_text import two_towers

    model = two_towers.Model(
        image=dict(variant="B/16", pool_type="map", head_zeroinit=False),  # zero: NaN grads of |0|
        text=dict(width=512, depth=12, num_heads=8, mlp_dim=2048, vocab_size=vocab),
        out_dim=512,
        temperature_init=1 / 0.07,
    )
    rng = np.random.default_rng(0)
    data = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (batch, 224, 224, 3)), jnp.float32),
        labels=jnp.asarray(rng.integers(1, vocab, (batch, 77)), jnp.int32),
    )
    params = jax.jit(model.init)(jax.random.key(0), data["image"], data["labels"])["params"]
    lr = optax.warmup_cosine_decay_schedule(0.0, LR, warmup, 439_087)
    kernels = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: k[-1].key == "kernel", p)  # noqa: E731
    adamw = optax.adamw(lr, b1=B1, b2=B2, eps=EPS, weight_decay=WD, mask=kernels)
    tx = optax.chain(optax.clip_by_global_norm(CLIP_NORM), adamw)

    def update_fn(train_state, rng, batch):
        def loss_fn(params):
            zimg, ztxt, extras = model.apply(
                {"params": params}, batch["image"], batch["labels"], train=True, rngs={"dropout": rng}
            )
            logits = zimg @ ztxt.T * extras["t"]
            mine = jnp.arange(logits.shape[0])
            i2t = jax.nn.log_softmax(logits, axis=1)[mine, mine]
            t2i = jax.nn.log_softmax(logits, axis=0)[mine, mine]
            return -(i2t.mean() + t2i.mean()) / 2

        params, opt = train_state["params"], train_state["opt"]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        l2 = lambda tree: jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))  # noqa: E731
        measured = dict(training_loss=loss, l2_grads=l2(grads), l2_params=l2(params), l2_updates=l2(updates))
        return {"params": params, "opt": opt}, measured

    step = jax.jit(update_fn, donate_argnums=0)  # as the trainer: the state is donated and carried
    return step, {"params": params, "opt": tx.init(params)}, jax.random.key(1), data


def run_big_vision(args) -> dict:
    import jax
    from common import matmul_peak_flops, median_seconds

    step, state, rng, data = big_vision_step(args.big_vision, args.vocab, args.batch)
    compiled, params = step.lower(state, rng, data).compile(), count(state["params"])
    carry = list(jax.block_until_ready(compiled(state, rng, data)))  # warm-up: (state, measurements)

    def run():
        carry[:] = compiled(carry[0], rng, data)
        return carry[1]

    out = dict(seconds=median_seconds(run, args.steps), loss=float(carry[1]["training_loss"]), vocab=args.vocab)
    return dict(out, params=params, flops=float(compiled.cost_analysis()["flops"]), peak=matmul_peak_flops())


def open_clip_step(vocab: int, batch: int, device: str = "cpu"):
    """(step() -> loss, model) for open_clip's ViT-B-16 with our vocabulary. On "cuda" the step runs under
    bf16 autocast (open_clip's `--precision amp_bf16`) with the batch on the GPU."""
    import contextlib

    import open_clip
    import torch

    if device == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-16")
    cfg["text_cfg"] = {**cfg["text_cfg"], "vocab_size": vocab}
    model = open_clip.CLIP(**cfg, output_dict=True).train().to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    plain = lambda n, p: p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if plain(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not plain(n, p)], "weight_decay": WD},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS)
    clip_loss = open_clip.loss.ClipLoss()
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand((batch, 3, 224, 224), generator=gen) * 2 - 1).to(device)
    texts = torch.randint(1, vocab, (batch, 77), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = clip_loss(**model(images, texts))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return step, model


def run_open_clip(args) -> dict:
    from cloc_jax import cpu

    cpu.keep_freed_memory()  # as bench/common.py does in the JAX workers: the same malloc for every worker
    step, model = open_clip_step(args.vocab, args.batch)
    step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return dict(seconds=statistics.median(times), loss=loss, params=params, vocab=args.vocab, flops=None)


def split_overrides(text: str) -> list[str]:
    """ "a.b=1,c=(1, 2)" -> ["a.b=1", "c=(1, 2)"]: split at commas that start a new `key=`."""
    return [s for s in re.split(r",(?=[\w.]+=)", text) if s]


def versions(bv_path: str) -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "open_clip_torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # torch is needed only when open_clip runs
            out[name] = None
    if bv_path:
        git = subprocess.run(["git", "-C", bv_path, "rev-parse", "HEAD"], capture_output=True, text=True)
        out["big_vision"] = git.stdout.strip() or "unknown commit (no .git in the checkout)"
    return out


def summary(impl: str, runs: list[dict], batch: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    out = dict(impl=impl, what=WHAT[impl], params=runs[0]["params"], vocab=runs[0]["vocab"], batch=batch)
    out.update(seconds_per_round=[round(r["seconds"], 3) for r in runs], seconds_per_step=seconds)
    out.update(images_per_s=batch / seconds, last_loss=runs[-1]["loss"])
    if "overrides" in runs[0]:
        out["overrides"] = runs[0]["overrides"]
    if runs[0].get("peak"):
        flops, peak = next(r["flops"] for r in runs if r["flops"]), statistics.median(r["peak"] for r in runs)
        out.update(flops_per_step=flops, achieved_flops_per_s=flops / seconds, peak_flops_per_s=peak)
        out["mfu"] = statistics.median(flops / r["seconds"] / r["peak"] for r in runs)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big_vision", default="", help="a checkout of google-research/big_vision (to run it)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every implementation")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ours", default="", help="config overrides for our model, key=value,key=value")
    parser.add_argument("--impls", default=",".join(IMPLS), help="which of " + ",".join(IMPLS))
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = split_overrides(args.ours)
    if args.worker:
        workers = dict(
            ours=lambda: run_ours(args, overrides),
            ours_cls=lambda: run_ours(args, overrides + list(CLS_TWIN)),
            big_vision=lambda: run_big_vision(args),
            open_clip=lambda: run_open_clip(args),
        )
        print(MARK + json.dumps(workers[args.worker]()), flush=True)
        return
    impls = [i for i in args.impls.split(",") if i]
    if unknown := set(impls) - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(unknown)}")
    if "big_vision" in impls and not os.path.isdir(args.big_vision):
        parser.error(f"--big_vision={args.big_vision!r}: pass a checkout of google-research/big_vision")
    vocab = our_vocab(overrides)
    library_versions = versions(args.big_vision)
    runs, failed = {impl: [] for impl in impls}, {}
    for r in range(args.rounds):
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={impl}", f"--vocab={vocab}"]
            cmd += [f"--big_vision={args.big_vision}", f"--steps={args.steps}", f"--batch={args.batch}"]
            cmd += [f"--ours={args.ours}"] + ([] if any(x["flops"] for x in runs[impl]) else ["--flops"])
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            found = [x[len(MARK) :] for x in proc.stdout.splitlines() if x.startswith(MARK)]
            if proc.returncode or not found:  # e.g. killed for memory by a neighbour's job: the round goes on
                failed[impl] = failed.get(impl, 0) + 1
                print(f"round {r + 1} {impl}: FAILED, exit {proc.returncode}", file=sys.stderr)
                continue
            runs[impl].append(json.loads(found[-1]))
            took = time.perf_counter() - start
            print(f"round {r + 1} {impl}: {runs[impl][-1]['seconds']:.2f} s/step ({took:.0f} s)", file=sys.stderr)
    lines = {impl: summary(impl, runs[impl], args.batch) for impl in impls if runs[impl]}
    for line in lines.values():
        print(json.dumps(line), flush=True)
    ips = {impl: line["images_per_s"] for impl, line in lines.items()}
    pairs = (("ours", "big_vision"), ("ours", "open_clip"), ("ours_cls", "open_clip"))
    ratios = {f"{a}/{b}": ips[a] / ips[b] for a, b in pairs if a in ips and b in ips}
    final = dict(ratios_images_per_s=ratios, params={impl: line["params"] for impl, line in lines.items()})
    final.update(vocab=vocab, batch=args.batch, rounds=args.rounds, steps=args.steps, failed_runs=failed)
    final["versions"] = library_versions
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
