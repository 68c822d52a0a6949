"""Orbax checkpoints: train state + grain iterator state + the model spec, saved together.

The model spec (model config, image size, tokenizer) travels with every checkpoint so a resumed or
exported run rebuilds exactly the same model, and a workdir holding a different model is refused.
"""

import os

import grain
import orbax.checkpoint as ocp

from cloc_jax.models.spec import spec_mismatch, with_defaults


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

    def save(self, step: int, state, data_iter: grain.DatasetIterator, spec: dict, force: bool = False) -> bool:
        args = dict(state=ocp.args.StandardSave(state), spec=ocp.args.JsonSave(spec))
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def spec(self, step: int) -> dict:
        return with_defaults(self.manager.restore(step, args=ocp.args.Composite(spec=ocp.args.JsonRestore()))["spec"])

    def check_spec(self, step: int, spec: dict) -> None:
        diff = spec_mismatch(self.spec(step), spec)
        if diff:
            raise ValueError(f"{self.directory} holds a checkpoint of a different model ({diff}); use a new --workdir")

    def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None = None):
        """Restores the state into `abstract_state`'s shapes and shardings; advances `data_iter` in place."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
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
