"""The GPU check: one command on a machine with one NVIDIA GPU (bench/gpu_check.sh installs, then runs this).

    python bench/gpu_check.py [--batch=256] [--rounds=2] [--steps=10] [--tiny_steps=120]

Prints one JSON line per measurement and exits 1 when a check fails:
  environment  JAX's backend and devices, torch's CUDA.
  gpu_tests    `pytest -m gpu tests/test_gpu.py` with JAX_PLATFORMS=cuda: cuDNN attention against XLA in value
               and gradient, a bf16 CLOC step finite (and running cuDNN), accumulation equal to the whole batch.
  tiny_run     launch/tpu.py --config=configs/cloc_tiny.py for --tiny_steps: the loss must drop.
  step_time    clip_b16 and cloc_b16 (configs as shipped: bf16 activations, float32 parameters, cuDNN attention,
               remat dots_no_batch, scanned layers; AdamW, the scenes batch) beside open_clip's ViT-B-16 (AMP
               bf16, torch AdamW, random batch of the same shapes and our vocabulary), each in its own process,
               --rounds interleaved rounds (A B C A B C), the same batch size on the same GPU. Images/s from the
               median step; MFU = model FLOPs (ours: aot.model_flops; open_clip: torch's FlopCounterMode of one
               step) / step time / the GPU's bf16 matmul peak (the larger of JAX's and torch's 8192^3 product,
               measured in the workers); then the ratio of each to open_clip.
Without a GPU the GPU steps print "skipped" with the reason (the GPU tests are collected and skipped); the
tiny run runs on the CPU. Each stage's wall time is in its line.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK = "GPU_CHECK_RESULT "
OURS = ("clip_b16", "cloc_b16")
failed = []


def emit(check: str, status: str, **fields) -> None:
    if status == "fail":
        failed.append(check)
    print(json.dumps({"check": check, "status": status, **fields}), flush=True)


def has_gpu() -> str | None:
    """The GPU's name from nvidia-smi, or None (no JAX here: the parent must not take the GPU's memory)."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def worker(name: str, args, timeout: int) -> dict:
    """Runs this script's --worker=name in a fresh process; -> its result dict, or {"error": ...}."""
    cmd = [sys.executable, __file__, f"--worker={name}", f"--batch={args.batch}", f"--steps={args.steps}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][-400:]}


def run_ours(name: str, batch: int, steps: int) -> dict:
    import jax.numpy as jnp
    from common import matmul_peak_flops, median_seconds, real_batch, sized_and_meshed, step_runner

    from cloc_jax.config import load_config_file
    from cloc_jax.data import pipeline
    from cloc_jax.train import aot, build

    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), "data=scenes")
    config.optim.name = "adamw"  # as open_clip trains
    config, mesh = sized_and_meshed(config, batch, cpu_layout=False)
    run, outs = step_runner(config, real_batch(config, mesh), mesh), []
    seconds = median_seconds(lambda: outs.append(run()) or outs[-1], steps)
    tags = pipeline.tag_vocabulary(config)
    flops = aot.model_flops(config, 0 if tags is None else len(tags))
    vocab = build(config)[1].text.vocab_size
    return dict(
        seconds=seconds,
        loss=float(outs[-1]["loss"]),
        flops=flops,
        peak=matmul_peak_flops(8192, 10, jnp.bfloat16),
        vocab=vocab,
    )


def run_open_clip(batch: int, steps: int, vocab: int) -> dict:
    import torch
    from peers import open_clip_step
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = open_clip_step(vocab, batch, device="cuda")
    step()  # warm-up
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()  # .item() waits for the GPU
        times.append(time.perf_counter() - start)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    peak = 10 * 2 * 8192**3 / (time.perf_counter() - start)
    return dict(seconds=statistics.median(times), loss=loss, flops=float(counter.get_total_flops()), peak=peak)


def run_worker(args) -> None:
    sys.path.insert(0, HERE)
    if args.worker == "env":
        import jax

        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = None
        devices = [d.device_kind for d in jax.devices()]
        out = dict(jax=jax.__version__, backend=jax.default_backend(), devices=devices, torch_cuda=cuda)
    elif args.worker in OURS:
        from cloc_jax import gpu

        for line in gpu.apply_presets() if gpu.on_gpu_host(os.environ) else []:  # as launch/tpu.py, before JAX
            print(line, file=sys.stderr)
        out = run_ours(args.worker, args.batch, args.steps)
    else:
        out = run_open_clip(args.batch, args.steps, int(args.worker.split(":")[1]))
    print(MARK + json.dumps(out), flush=True)


def gpu_tests(gpu: str | None) -> None:
    start = time.time()
    env = {**os.environ, "JAX_PLATFORMS": "cuda" if gpu else "cpu"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-n", "0", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out.stdout)}
    status = "fail" if out.returncode not in (0, 5) or counts.get("failed") or counts.get("error") else "pass"
    if not gpu and status == "pass":
        status = "skipped"
    tail = out.stdout.strip().splitlines()[-1:] if status == "fail" else []
    emit("gpu_tests", status, **counts, seconds=round(time.time() - start, 1), tail=tail)


def tiny_run(steps: int) -> None:
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        every = max(steps // 6, 1)
        cmd = [sys.executable, "launch/tpu.py", "--config=configs/cloc_tiny.py", f"--workdir={workdir}"]
        cmd += [f"--config.num_steps={steps}", f"--config.log_every={every}", "--config.eval_every=0"]
        cmd += ["--config.checkpoint_every=100000", "--config.optim.warmup_steps=20"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        rows = []
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if '"loss"' in line]
    losses = [round(r["loss"], 4) for r in rows]
    platform = next(iter(re.findall(r"Running on (\w+)", out.stdout)), "?")
    dropped = len(losses) >= 3 and out.returncode == 0 and statistics.mean(losses[-2:]) < 0.8 * losses[0]
    tail = [] if dropped else (out.stderr.strip().splitlines() or [""])[-1:]
    emit("tiny_run", "pass" if dropped else "fail", platform=platform, steps=steps, losses=losses,
         seconds=round(time.time() - start, 1), tail=tail)  # fmt: skip


def step_times(gpu: str | None, args) -> None:
    if not gpu:
        emit("step_time", "skipped", reason="no NVIDIA GPU (nvidia-smi found none)")
        return
    results = {name: [] for name in (*OURS, "open_clip")}
    vocab = None
    for r in range(args.rounds):
        for name in results:
            start = time.time()
            out = worker(name if name in OURS else f"open_clip:{vocab or 49408}", args, timeout=300)
            if name == OURS[0] and "vocab" in out:
                vocab = out["vocab"]  # open_clip gets our vocabulary (the same text embedding table)
            ok = "error" not in out and out.get("loss") == out.get("loss")  # a NaN loss fails
            images = args.batch / out["seconds"] if "seconds" in out else None
            emit("step_time", "pass" if ok else "fail", impl=name, round=r, batch=args.batch, gpu=gpu,
                 images_per_s=images, wall=round(time.time() - start, 1), **out)  # fmt: skip
            if ok:
                results[name].append(out)
    peak = max((o["peak"] for outs in results.values() for o in outs), default=None)
    if not results["open_clip"] or not peak:
        return
    base = args.batch / statistics.median(o["seconds"] for o in results["open_clip"])
    for name, outs in results.items():
        if outs:
            seconds = statistics.median(o["seconds"] for o in outs)
            mfu = outs[0]["flops"] / seconds / peak
            emit("summary", "pass", impl=name, images_per_s=args.batch / seconds, mfu=mfu, peak_flops=peak,
                 vs_open_clip=args.batch / seconds / base, gpu=gpu)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="global batch of the timed B/16 steps")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three timed steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker, after one warm-up")
    parser.add_argument("--tiny_steps", type=int, default=120, help="steps of the cloc_tiny run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    gpu = has_gpu()
    env = worker("env", args, timeout=120)
    emit("environment", "pass" if "error" not in env else "fail", gpu=gpu, **env)
    gpu_tests(gpu)
    tiny_run(args.tiny_steps)
    step_times(gpu, args)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
