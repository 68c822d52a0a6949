"""Training: the state (`state.py`), the step (`step.py`), the loop (`loop.py`) and compiling the step ahead of
time for a TPU topology (`aot.py`)."""

from cloc_jax.train.loop import check_host_memory, input_stall, train_and_evaluate
from cloc_jax.train.state import TrainState, abstract_state, adopt_architecture, build, init_from, init_state
from cloc_jax.train.step import compile_step, make_train_step

__all__ = [
    "TrainState",
    "abstract_state",
    "adopt_architecture",
    "build",
    "check_host_memory",
    "compile_step",
    "init_from",
    "init_state",
    "input_stall",
    "make_train_step",
    "train_and_evaluate",
]
