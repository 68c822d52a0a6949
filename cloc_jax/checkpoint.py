"""Orbax checkpoints: train state + grain iterator state + the model spec, saved together.

The model spec (model config, image size, tokenizer) travels with every checkpoint so a resumed or
exported run rebuilds exactly the same model, and a workdir holding a different model is refused. A
checkpoint that cannot be read (a half-written or damaged file) is passed over for the newest readable
one with a one-line warning; training moves it to `<workdir>/checkpoints_unreadable/` for a person to
inspect, so rotation and later saves never mistake it for a good one.
"""

import os
import re
import shutil

import grain
import jax
import jax.experimental.multihost_utils
import orbax.checkpoint as ocp
from etils import epath

from cloc_jax.models.spec import LAYOUT_KEYS, Spec, from_dict, mismatch


class NotResumable(ValueError):
    """A readable checkpoint this run cannot continue (another model, another process count): never
    taken for a damaged one."""


def _reason(error: Exception) -> str:
    """An exception as one short line (Orbax and TensorStore errors can be pages long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


class Checkpoints:
    """One Orbax CheckpointManager under `<workdir>/checkpoints` (async saves, keeps the newest `keep`)."""

    def __init__(self, workdir: str, keep: int = 3, every: int = 1000, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter: grain.DatasetIterator, spec: Spec, force: bool = False) -> bool:
        args = dict(state=ocp.args.StandardSave(state), spec=ocp.args.JsonSave(spec.to_json()))
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def spec(self, step: int) -> Spec:
        return from_dict(self.manager.restore(step, args=ocp.args.Composite(spec=ocp.args.JsonRestore()))["spec"])

    def check_spec(self, step: int, spec: Spec) -> None:
        """Refuses a checkpoint of another model; layout keys (remat, dtype, packing) may differ."""
        diff = mismatch(self.spec(step), spec, ignore=LAYOUT_KEYS)
        if diff:
            raise NotResumable(
                f"{self.directory} holds a checkpoint of a different model ({diff}); use a new --workdir"
            )

    def newest_readable(self, read) -> tuple[int | None, object, list[int]]:
        """(step, read(step), newer unreadable steps) for the newest checkpoint `read` succeeds on, with a
        one-line warning for each one it fails on; (None, None, []) without checkpoints. Checkpoints that
        exist but none readable is a one-line error."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, read(step), failed
            except NotResumable:
                raise
            except Exception as error:  # TensorStore, Orbax, JSON, OS: any way a file breaks
                failed.append(step)
                print(f"warning: checkpoint {self._path(step)} is unreadable ({_reason(error)}); trying an older one")
        if failed:
            raise ValueError(f"no readable checkpoint in {self.directory} (tried steps {failed}; see the warnings)")
        return None, None, []

    def restore_newest(self, abstract_state, data_iter: grain.DatasetIterator, spec: Spec):
        """(step, state) of the newest readable checkpoint of this model, or (None, None) if there is none.
        Newer unreadable ones are moved aside once an older one has restored."""

        def read(step):
            self.check_spec(step, spec)
            return self.restore(step, abstract_state, data_iter)

        step, state, unreadable = self.newest_readable(read)
        self.move_aside(unreadable)
        return step, state

    def _check_process_count(self, step: int) -> None:
        """Each host saved its own data position: they continue only with as many hosts."""
        data = epath.Path(self._path(step)) / "data"
        counts = {int(m.group(1)) for f in data.iterdir() if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
        if counts and jax.process_count() not in counts:
            raise NotResumable(
                f"checkpoint {self._path(step)} was saved by {min(counts)} processes and its data positions "
                f"cannot continue with {jax.process_count()}: resume with {min(counts)}, or start a new --workdir "
                f"with --config.init_from=<an export of it>"
            )

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def move_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints to `checkpoints_unreadable/` beside the checkpoints (process 0)."""
        if not steps:
            return
        aside = self.directory + "_unreadable"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
                shutil.move(self._path(step), target)
                print(f"Moved unreadable checkpoint {self._path(step)} to {target}")
        jax.experimental.multihost_utils.sync_global_devices("cloc_jax: unreadable checkpoints moved")
        self.manager.reload()

    def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None = None):
        """Restores the state into `abstract_state`'s shapes and shardings; advances `data_iter` in place."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
            self._check_process_count(step)
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def restore_params(self, step: int, abstract_params):
        """Only the parameters (no optimizer state, no data iterator): what export needs."""
        item = {"params": abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
