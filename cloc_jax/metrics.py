"""Metric sinks: stdout, TensorBoard event files and `<workdir>/metrics.jsonl`, written by process 0 only."""

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, echo=print) -> None:
        """One JSON object per call; `echo` prints the line (tqdm.write keeps the progress bar intact)."""
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, int(step))
        self.tb.flush()
        echo(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
