"""What every process of a multi-host run must agree on: when to stop, where the data is.

Single-process runs take the trivial path; with several processes these gather over
`jax.experimental.multihost_utils`, so every process calls them at the same point of each step.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dga_jax.errors import InputError


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class StopSignal:
    """Records SIGTERM / SIGINT so the loop can save and stop; a second signal kills as usual.

    Python takes signal handlers on the main thread only: elsewhere (a run started from a
    thread) the signals act as usual, with a warning.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            logging.warning(
                "training off the main thread: SIGTERM / SIGINT stop the run without a "
                "checkpoint (Python handles signals on the main thread only)"
            )
            return
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name
        self.restore()

    def agreed(self) -> bool:
        """True on every process once any process has received a signal."""
        return any_process(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_rows_state(state: dict[str, Any]) -> dict[str, Any]:
    """The data iterator state of every process's rows, merged (what a checkpoint stores)."""
    if jax.process_count() == 1:
        return state
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.ravel(multihost_utils.process_allgather(np.int64(blob.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    gathered = multihost_utils.process_allgather(padded)
    merged = {**state, "rows": {}}
    for data, size in zip(gathered, sizes, strict=True):
        merged["rows"].update(json.loads(bytes(data[:size]).decode())["rows"])
    return merged


def rows_state(state: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """This process's part of a merged data state (a checkpoint's): an `InputError` if the
    state is not one or lacks some of `rows`."""
    saved = state.get("rows") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise InputError(
            f"the checkpoint's data state is not a data iterator's (no rows): got {state!r:.200}"
        )
    missing = [r for r in rows if str(r) not in saved]
    if missing:
        raise InputError(
            f"the checkpoint's data state has no rows {missing}: was it written "
            "with another global batch size?"
        )
    return {**state, "rows": {str(r): saved[str(r)] for r in rows}}
