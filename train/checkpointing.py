"""Orbax checkpoints of a run: train state, data position and run record, saved async.

Each step directory holds `state` (parameters, optimizer state, step, counters), `data` (the
data iterator's JSON state) and `run` (the config that wrote it, and whether the step's
evaluation is still owed). What survives what:

- a crash or SIGKILL mid-save: Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it
  when complete, so a partial save never looks like a checkpoint (and is deleted on restart);
- a damaged newest checkpoint (a file truncated or deleted): `restore_newest` warns, moves it to
  `<workdir>/damaged_checkpoints/` and restores the one before it; with several processes, a
  checkpoint that fails on any one of them is passed over by all;
- a failed save (disk full, file size limit): `CheckpointSaveError` names the step and the cause;
  the checkpoints before it are untouched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.hosts import any_process
from train.step import TrainState

ITEMS = ("state", "data", "run")
# Orbax's barriers' names start with it; `_restore_items` names one of them.
BARRIER_PREFIX = "dga_jax"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are intact."""


class PeerRestoreError(RuntimeError):
    """A checkpoint restored on this process but not on another one."""


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint of a run failed to restore; none was moved."""


class Checkpoints:
    """Saves every `every` steps (and on demand), keeps the newest `keep`."""

    def __init__(self, directory: Path, *, every: int, keep: int):
        self.directory = Path(directory).absolute()
        # Orbax's default policy also saves the first step of a run with no checkpoint yet.
        policies = ocp.checkpoint_managers
        due = policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=due,
            max_to_keep=keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=BARRIER_PREFIX
            ),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # the step of a save that may still be running

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: Callable[[], dict[str, Any]],
        run_record: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Starts an async save when `step` is due by the cadence (or `force`) and not saved yet;
        returns whether it did. `data_state` is called only then (with several processes it
        gathers every process's rows: not a round trip between hosts at every step). Raises
        `CheckpointSaveError` naming the step if this save, or the previous one (which a new
        save waits for, as Orbax does), cannot be written."""
        due = force or self.manager.should_save(step)
        if not due or step in self.manager.all_steps():
            return False
        self._finish_pending()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state()),
            run=ocp.args.JsonSave(run_record),
        )
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as error:
            raise self._save_failed(step, error) from error
        self._pending = step
        return True

    def run_record(self, step: int) -> dict[str, Any] | None:
        """The `run` item of `step` (None for a checkpoint written before it existed)."""
        if not self._has_run_record(step):
            return None
        return self._restore_items(step, run=ocp.args.JsonRestore()).run

    def restore(
        self, step: int, abstract_state: TrainState
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any] | None]:
        """The state at `step`, placed by `abstract_state`'s shardings, the data state and the
        run record (None for a checkpoint written before it existed)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
        has_run = self._has_run_record(step)
        if has_run:
            items["run"] = ocp.args.JsonRestore()
        restored = self._restore_items(step, **items)
        return restored.state, restored.data, restored.run if has_run else None

    def restore_newest(
        self, abstract_state: TrainState
    ) -> tuple[int, TrainState, dict[str, Any], dict[str, Any] | None] | None:
        """The newest checkpoint whose items all restore, as (step, state, data state, run
        record); None if there is none. Newer ones that fail are moved to
        `damaged_checkpoints/` once an older one has restored; if none restores, nothing is
        moved and `NoUsableCheckpointError` names them."""
        failures = []
        for step in reversed(self.steps()):
            try:  # raises on every process if it fails on any
                state, data, run = self.restore(step, abstract_state)
            except Exception as error:  # damage shows as JSON, TensorStore or OS errors
                failures.append((step, f"{type(error).__name__}: {_reason(error)}"))
                logging.warning(
                    "checkpoint %s is damaged (%s)", self.directory / str(step), failures[-1][1]
                )
                continue
            for damaged, _ in failures:
                self._move_aside(damaged)
            return step, state, data, run
        if failures:
            raise NoUsableCheckpointError(
                f"no checkpoint in {self.directory} restores: "
                + "; ".join(f"step {step}: {why}" for step, why in failures)
            )
        return None

    def _restore_items(self, step: int, **items: Any) -> Any:
        """Orbax's restore of `items` of `step`; raises on every process if it fails on any
        (`PeerRestoreError` where it restored), so that all go on to the same next step.

        A restore that raises on this process only skips the barrier that ends it on the others:
        this process meets it, else its next gather met their barrier (`sync_global_devices name
        mismatch`, a good checkpoint taken for damaged, then a hang)."""
        try:
            restored, failed = self.manager.restore(step, args=ocp.args.Composite(**items)), None
        except Exception as error:
            restored, failed = None, error
            if jax.process_count() > 1:
                key = ocp.multihost.unique_barrier_key(
                    "Checkpointer:restore", prefix=BARRIER_PREFIX
                )
                ocp.multihost.sync_global_processes(key)
        if any_process(failed is not None):
            if failed is not None:
                raise failed
            raise PeerRestoreError(
                f"checkpoint {self.directory / str(step)} failed to restore on another process"
            )
        return restored

    def _has_run_record(self, step: int) -> bool:
        return (self.directory / str(step) / "run").is_dir()

    def close(self) -> None:
        """Waits for a pending save; raises `CheckpointSaveError` if it failed."""
        try:
            self._finish_pending()
        finally:
            self.manager.close()

    def _finish_pending(self) -> None:
        """Waits for the async save in flight, if any; its failure raises, naming its step."""
        if self._pending is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(self._pending, error) from error
        self._pending = None

    def _save_failed(self, step: int, error: Exception) -> CheckpointSaveError:
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)  # the space it took, back
        self._pending = None
        # Orbax forgets the steps over `keep` when a save starts, and deletes them once it ends:
        # after a failure they are still on disk, and still the ones to resume from.
        self.manager.reload()
        kept = self.steps()
        newest = f"step {kept[-1]}" if kept else "none"
        return CheckpointSaveError(
            f"could not save the checkpoint of step {step} in {self.directory}: "
            f"{_reason(error)}; the newest complete checkpoint ({newest}) is intact: free "
            "space (or raise the file size limit) and rerun the same command to resume from it"
        )

    def _move_aside(self, step: int) -> None:
        """Moves a damaged step directory out of Orbax's view, keeping its files."""
        if jax.process_index() == 0:
            target = self.directory.parent / "damaged_checkpoints" / str(step)
            suffix = 0
            while target.exists():
                suffix += 1
                target = target.with_name(f"{step}-{suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)
            logging.warning("moved damaged checkpoint %d to %s", step, target)
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()


def _reason(error: Exception) -> str:
    """The gist of an Orbax / TensorStore error, whose messages run over many lines: the
    operating system's reason where it gives one (`No space left on device`)."""
    text = str(error)
    errno = re.search(r"os_error_code='?(\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
    if errno:
        return f"{os.strerror(int(errno.group(1)))}, errno {errno.group(1)}"
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
