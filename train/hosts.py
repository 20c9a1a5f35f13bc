"""What every process of a multi-host run must agree on: when to stop, where the data is.

Single-process runs take the trivial path; with several processes these gather over
`jax.experimental.multihost_utils`, so every process calls them at the same point of each step.
A process that fails cannot take part in the next gather, so `fail_together` ends its peers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dga_jax.errors import InputError


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


FAILED_KEY = "dga_jax/train/failed"  # the coordination service's key of a process's failure
PEER_FAILED_EXIT_CODE = 1


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """An exception that leaves the block on one process ends every other process at once.

    Without it the others wait for the failed one in their next collective (a gather, the
    train step, an Orbax barrier): forever on GPU and CPU, and the failed process waits for them
    in `jax.distributed`'s shutdown barrier. The failure is published on the coordination
    service; a thread of each other process waits for it, prints `error: process i failed: ...`
    to stderr and exits with code 1 (its main thread may be stuck in a collective).
    """
    # Orbax's public accessor of `jax.distributed`'s client (JAX has none; Orbax follows it).
    if jax.process_count() == 1 or not ocp.multihost.is_jax_distributed_client_initialized():
        yield
        return
    client = ocp.multihost.get_jax_distributed_client()
    finished = threading.Event()
    watcher = threading.Thread(
        target=_end_on_peer_failure, args=(client, finished), name="fail_together", daemon=True
    )
    watcher.start()
    try:
        yield
    except BaseException as error:
        finished.set()  # this process reports its own error, as usual
        message = f"process {jax.process_index()} failed: {type(error).__name__}: {error}"
        try:
            client.key_value_set(FAILED_KEY, message[:2000], allow_overwrite=True)
        except Exception as unpublished:  # the service is gone: `error` is still the one to see
            logging.error("could not tell the other processes: %s", unpublished)
        raise
    finally:
        finished.set()
        watcher.join()  # out of the client before `jax.distributed` shuts it down at exit


def _end_on_peer_failure(client, finished: threading.Event) -> None:
    """Waits for a peer's failure (polling, so that it notices `finished`), then exits."""
    while not finished.is_set():
        try:
            message = client.blocking_key_value_get(FAILED_KEY, 1000)
        except Exception:  # the wait timed out (or the service is going away): ask again
            finished.wait(0.1)
            continue
        if finished.is_set():
            return
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        logging.error("ending this process: %s", message)
        with contextlib.suppress(Exception):
            # Meets the failed process in `jax.distributed`'s shutdown barrier, which it waits
            # in as it exits: else it would wait there until the heartbeat timeout (100 s).
            client.shutdown()
        os._exit(PEER_FAILED_EXIT_CODE)  # the main thread may be inside a collective


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
