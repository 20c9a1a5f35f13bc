"""`config.train.profile_steps`: a `jax.profiler` trace of a few training steps.

    python -m train --config=configs/tiny_dga.py --workdir=runs/x --config.train.profile_steps=10,12

writes the trace of steps 10 to 12 (1-based, inclusive) under `<workdir>/profile`, which
TensorBoard's profile plugin (`tensorboard --logdir <workdir>/profile`) and Perfetto (the
`.trace.json.gz` beside the `.xplane.pb`) open; every process writes its own host's file. Each
step is a `StepTraceAnnotation`, so the tools split the timeline by step. Start later than the
first step to keep compilation out of the trace, as MaxText's `skip_first_n_steps_for_profiler`
does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax


class StepProfiler:
    """Starts the trace before step `first` and stops it once step `last` has finished."""

    def __init__(self, steps: tuple[int, int] | None, workdir: Path):
        self.steps, self.directory, self.active = steps, workdir / "profile", False

    def annotate(self, step: int):
        """The context of one step: its trace annotation (inert outside a trace)."""
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finished(self, step: int, outputs) -> None:
        """After step `step` returned `outputs`: the trace ends once they are computed."""
        if self.active and step == self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (a run stopped before its last profiled step)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile written to %s", self.directory)
