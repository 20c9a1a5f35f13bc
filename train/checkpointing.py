"""Orbax checkpoints of the train state and the data iterator, saved atomically and async.

Each step directory holds `state` (parameters, optimizer state, step, counters) and `data` (the
data iterator's JSON state). Orbax writes to a temporary directory and renames it when complete,
so a crash mid-save never leaves a checkpoint that looks whole; restore reads the newest complete
one into an abstract state that carries shardings, so each array goes straight to its devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from train.step import TrainState


class Checkpoints:
    """Saves every `every` steps (and on demand), keeps the newest `keep`."""

    def __init__(self, directory: Path, *, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_state: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts an async save when `step` is due (or `force`); returns whether it did."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step`, placed by `abstract_state`'s shardings, and the data state."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data

    def close(self) -> None:
        """Waits for pending saves to finish."""
        self.manager.wait_until_finished()
        self.manager.close()
