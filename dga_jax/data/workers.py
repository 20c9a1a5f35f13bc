"""Grain's worker processes: started with the stop signals blocked, ended with their parent.

A terminal's Ctrl-C, SLURM's scancel or `timeout` send SIGINT / SIGTERM to the whole process
group: the main process stops the run (a checkpoint first); Grain's workers must not die of
them, even while starting (an evaluation starts its own), so they start with them blocked
(`stop_signals_blocked`) and end themselves once their parent is gone (`prefetch`).
Closing the iterator ends the workers without a signal (SIGKILL if one hangs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker

import grain
from absl import flags

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PARENT_POLL_S = 1.0  # how often a worker checks that its parent still lives


def prefetch(dataset: grain.IterDataset, num_workers: int, buffer: int) -> grain.IterDataset:
    """`dataset` made in `num_workers` Grain worker processes, `buffer` elements ahead each,
    each worker ending itself once this process is gone."""
    _check_absl_flags_parsed()
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)
    return dataset.mp_prefetch(
        options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid())
    )


def _exit_with_parent(parent: int, worker: int, workers: int) -> None:
    """A Grain worker's init: it never sees `STOP_SIGNALS`, so it ends itself once `parent` is
    gone (killed without closing the iterator: the OOM killer, SIGKILL, an abort), checked each
    second, instead of living on as an orphan that only SIGKILL stops."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Blocks `STOP_SIGNALS` in this thread (and the threads and processes it starts) for the
    block, as CPython starts its resource tracker. A signal for this process meanwhile goes to
    another thread, or waits for the block's end: none is lost."""
    # The tracker's start (at a process's first spawn) unblocks them in the spawning thread.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _check_absl_flags_parsed() -> None:
    """Grain 0.2.18's `mp_prefetch` reads an absl flag (google/grain#1355), which fails unless
    absl has parsed the command line; the library leaves global flags to the entry points."""
    if not flags.FLAGS.is_parsed():
        raise RuntimeError(
            "data.num_workers > 0 needs absl flags parsed (Grain reads one): run under "
            "absl.app.run, or call absl.flags.FLAGS.mark_as_parsed() at your entry point"
        )
