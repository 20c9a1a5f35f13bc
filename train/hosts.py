"""What every process of a multi-host run must agree on: when to stop, where the data is.

Single-process runs take the trivial path; with several processes these gather over
`jax.experimental.multihost_utils`, so every process calls them at the same point of each step.
A process that fails cannot take part in the next gather, so `fail_together` ends its peers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
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


def process_sum(value: int) -> int:
    """The sum of every process's `value`, on every process."""
    if jax.process_count() == 1:
        return value
    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


FAILED_KEY = "dga_jax/train/failed"  # + the block's number: the coordination service's key
PEER_FAILED_EXIT_CODE = 1
GRACE_S = 2.0  # a process that fails too within it reports its own error, not its peer's
SHUTDOWN_S = 60.0  # the most a peer waits to meet the failed process in the shutdown barrier
# A watcher's wait for the key per call. A published failure ends the wait at once; the end of
# a block joins the watcher, so waits for the call under way (at 5 s, every clean run's end did).
POLL_MS = 1000
_blocks = itertools.count()  # every process enters its blocks in the same order


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """An exception that leaves the block on one process ends every other process.

    Without it the others wait for the failed one in their next collective (a gather, the
    train step, an Orbax barrier): forever on GPU and CPU, and the failed process waits for them
    in `jax.distributed`'s shutdown barrier. The first failure is published on the coordination
    service under this block's own key (a later block does not see it); a thread of each other
    process waits for it and, unless its own main thread fails within `GRACE_S`, prints
    `error: process i failed: ...` to stderr, stops its worker processes, meets the failed
    process in `jax.distributed.shutdown` and exits with code 1 (its main thread may be stuck in
    a collective, so `os._exit`).
    """
    # Orbax's public accessor of `jax.distributed`'s client (JAX has none; Orbax follows it).
    if jax.process_count() == 1 or not ocp.multihost.is_jax_distributed_client_initialized():
        yield
        return
    client = ocp.multihost.get_jax_distributed_client()
    key, finished = f"{FAILED_KEY}/{next(_blocks)}", threading.Event()
    watcher = threading.Thread(
        target=_end_on_peer_failure, args=(client, key, finished), name="fail_together", daemon=True
    )
    watcher.start()
    try:
        yield
    except BaseException as error:
        finished.set()  # this process reports its own error, as usual
        _publish(
            client, key, f"process {jax.process_index()} failed: {type(error).__name__}: {error}"
        )
        raise
    finally:
        finished.set()
        watcher.join()  # out of the client before `jax.distributed` shuts it down at exit


def _publish(client, key: str, message: str) -> None:
    """Sets `key` unless a peer's failure holds it already: the first failure is the cause (a
    later one is usually a collective broken by it)."""
    try:
        client.key_value_set(key, message[:2000])
    except Exception as unpublished:  # taken, or the service is gone: `error` is raised anyway
        logging.info("this failure is not published to the other processes: %s", unpublished)


def _end_on_peer_failure(client, key: str, finished: threading.Event) -> None:
    """Waits for a peer's failure (polling, so that it notices `finished`), then exits."""
    while not finished.is_set():
        try:
            message = client.blocking_key_value_get(key, POLL_MS)
        except Exception:  # the wait timed out (or the service is going away): ask again
            finished.wait(0.1)
            continue
        if finished.wait(GRACE_S):  # done, or failed itself: its own error is the one to see
            return
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        logging.error("ending this process: %s", message)
        _exit_now(PEER_FAILED_EXIT_CODE)


def _exit_now(code: int) -> None:
    """Exits a process whose main thread may be stuck in a collective. `os._exit` skips the
    clean-ups that matter here, so they run first: worker processes (Grain's would outlive it;
    they ignore SIGTERM, hence SIGKILL), and `jax.distributed.shutdown`, which meets the failed
    process in its shutdown barrier and, on process 0, stops the coordination service only
    after the others have left it (exiting first made the failed process abort there).
    Bounded: a peer that never arrives costs `SHUTDOWN_S`, not the barrier's minutes."""
    for child in multiprocessing.active_children():
        child.kill()
    shutdown = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    shutdown.start()
    shutdown.join(SHUTDOWN_S)
    logging.shutdown()
    os._exit(code)


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
