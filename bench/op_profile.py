"""Where the training step's time goes: XLA's per-op trace of the compiled step, grouped by the model code
each op came from.

    python bench/op_profile.py --config=configs/clip_b16.py:data=scenes --batch=16

Runs the step as bench/step.py does (the CPU layout on a CPU unless `--nocpu_layout`), traces `--steps` steps
with jax.profiler and adds up every XLA op's time over all threads. Each op is put in a group by the JAX name
stack in its HLO metadata (a fusion by the dot inside it, else by its last named op): the MLP, the attention
projections, the attention core (scores, softmax, weighted sum), layer norms, embeddings, the optimizer
update, layout-only ops (copies, transposes, slices, zero fills) and the rest (losses, heads, ...).
Prints one JSON line: seconds per step, op seconds per step, and each group's share of the op time.
"""

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
from absl import app, flags, logging
from common import CPU_LAYOUT, real_batch, sized_and_meshed, step_runner
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 2, "traced steps (after one warm-up)")
_CPU_LAYOUT = flags.DEFINE_bool("cpu_layout", True, "on a CPU: float32, no remat, layers unrolled")

# First match wins: (group, pattern on the HLO op_name, the JAX name stack of the op). The forward pass is
# under jvp(...) and the backward under transpose(jvp(...)); what is under neither is the optimizer update.
GROUPS = (
    ("attention projections", r"/attn/(query|key|value|out)/"),
    ("attention core", r"/attn/"),
    ("mlp", r"/mlp/"),
    ("layer norms", r"/(ln\w*|norm\w*|LayerNorm\w*)/"),
    ("patch and token embeddings", r"/(patch_embed|token_embed)/"),
    ("losses", r"/(transpose\()?jvp\(\)"),  # the loss functions, traced outside the model
    ("optimizer update", r"^(?!.*(jvp|transpose)\().+"),
)
LAYOUT_OPCODES = {
    "copy",
    "transpose",
    "broadcast",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "pad",
    "concatenate",
    "reshape",
    "bitcast",
    "constant",
    "iota",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _instructions(hlo: str) -> tuple[dict, dict]:
    """name -> (opcode, op_name, called computation), and computation -> its instruction names."""
    table, members, current = {}, collections.defaultdict(list), None
    for line in hlo.splitlines():
        if (m := _COMPUTATION.match(line)) and " = " not in line:
            current = m.group(1)
            continue
        if not (m := _INSTRUCTION.match(line)):
            continue
        name, opcode = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        table[name] = (opcode, op_name.group(1) if op_name else "", called.group(1) if called else None)
        members[current].append(name)
    return table, members


def _group(name: str, table: dict, members: dict) -> str:
    opcode, op_name, called = table.get(name, ("", "", None))
    inside = [table[n] for n in members.get(called, [])] if called else []
    dots = [t for t in inside if t[0] in ("dot", "convolution")]
    if dots:  # a fusion around a matmul is the matmul's
        opcode, op_name = dots[0][:2]
    elif inside:
        opcodes = {t[0] for t in inside} - {"parameter"}
        if opcodes <= LAYOUT_OPCODES:
            return "layout"
        opcode, op_name = next((t for t in reversed(inside) if t[1]), inside[-1])[:2]
    for group, pattern in GROUPS:
        if re.search(pattern, op_name):
            return group
    return "layout" if opcode in LAYOUT_OPCODES else "other"


def op_seconds(trace_dir: str, module: str) -> dict:
    """hlo op name -> seconds over all threads, from the perfetto trace of `module`'s executions."""
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            seconds[args["hlo_op"]] += e["dur"] * 1e-6
    return seconds


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config, mesh = sized_and_meshed(_CONFIG.value, _BATCH.value, _CPU_LAYOUT.value)
    run = step_runner(config, real_batch(config, mesh), mesh)
    hlo = run.compiled().as_text()
    module = hlo.split("\n", 1)[0].split()[1].rstrip(",")  # "HloModule jit_train_step, ..."
    table, members = _instructions(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                jax.block_until_ready(run())
            seconds = (time.perf_counter() - start) / _STEPS.value
        per_op = op_seconds(trace_dir, module)
    groups = collections.Counter()
    for name, s in per_op.items():
        groups[_group(name, table, members)] += s / _STEPS.value
    total = sum(groups.values())
    print(
        json.dumps(
            dict(
                config=config.model.image.variant,
                layout={k: config.model[k] for k in CPU_LAYOUT},
                batch=config.batch_size,
                seconds_per_step=round(seconds, 3),
                op_seconds_per_step=round(total, 3),
                share={g: round(s / total, 3) for g, s in groups.most_common()},
            )
        )
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
