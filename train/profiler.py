"""`config.train.profile_steps`: a `jax.profiler` trace of a few training steps.

    python -m train --config=configs/tiny_dga.py --workdir=runs/x --config.train.profile_steps=10,12

writes the trace of steps 10 to 12 (1-based, inclusive) under `<workdir>/profile`, which
TensorBoard's profile plugin (`tensorboard --logdir <workdir>/profile`) and Perfetto (the
`.trace.json.gz` beside the `.xplane.pb`) open. With several processes each traces into
`<workdir>/profile/process_<i>`: the tools name a trace by host and second, so processes on one
host would overwrite each other's in a shared directory. Each step is a `StepTraceAnnotation`,
so the tools split the timeline by step. Start later than the first step to keep compilation
out of the trace, as MaxText's `skip_first_n_steps_for_profiler` does. A run resumed inside the
range traces the steps it runs; one resumed past it, none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax


class StepProfiler:
    """Starts the trace before the first step of (first, last) that this process runs and stops
    it once step `last` has finished; a run resumed after step `start` runs from `start + 1`."""

    def __init__(self, steps: tuple[int, int] | None, workdir: Path, *, start: int):
        self.steps, self.directory, self.active = steps, _trace_directory(workdir), False
        if steps is not None and start >= steps[0]:
            _warn_resumed(steps, start)

    def annotate(self, step: int):
        """The context of one step: its trace annotation (inert outside a trace)."""
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            try:
                jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
                self.active = True
            except Exception as error:  # the profiler raises bare and runtime errors
                self._failed("start", error)
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finished(self, step: int, outputs) -> None:
        """After step `step` returned `outputs`: the trace ends once they are computed."""
        if self.active and step == self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (a run stopped before its last profiled step)."""
        if not self.active:
            return
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as error:  # the profiler raises bare and runtime errors
            self._failed("write", error)
            return
        logging.info("profile written to %s", self.directory)

    def _failed(self, what: str, error: Exception) -> None:
        """A trace that cannot start or be written costs the profile, not the run."""
        self.steps = None
        logging.warning(
            "config.train.profile_steps: could not %s the trace in %s (%s: %s); training goes "
            "on without it",
            what,
            self.directory,
            type(error).__name__,
            error,
        )


def _trace_directory(workdir: Path) -> Path:
    """`<workdir>/profile`, or this process's directory in it when there are several."""
    directory = workdir / "profile"
    if jax.process_count() == 1:
        return directory
    return directory / f"process_{jax.process_index()}"


def _warn_resumed(steps: tuple[int, int], start: int) -> None:
    """Says which of the profiled `steps` a run resumed after step `start` (in or past them)
    still traces."""
    first, last = steps
    if start >= last:
        traced = "none of them: no profile is written"
    else:
        traced = f"steps {start + 1} to {last}, the first with its compilation"
    logging.warning(
        "config.train.profile_steps=%d,%d: the run resumes after step %d and traces %s",
        first,
        last,
        start,
        traced,
    )
