"""Entry point: `python -m train --config=configs/tiny_dga.py [--config.key=value] [--workdir=DIR]`.

Multi-host: `--distributed` calls `jax.distributed.initialize()` before anything touches the
devices; on TPU pods and SLURM/Kubernetes GPU clusters it finds its peers by itself, elsewhere
pass `--coordinator_address=host:port --num_processes=N --process_id=i` on every host.

A problem with the user's input (a config key, a missing file, a checkpoint of another model)
ends the run with one line `error: ...` and exit code 2; a run that cannot go on (a checkpoint
that cannot be written, divergence) with one such line and exit code 1. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from dga_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and plots go; default: runs/<config name>."
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO chatter
    # JAX's INFO line at backend start ("Unable to initialize backend 'tpu'" on every CPU or GPU
    # host) came before a run's first line, and before the one `error: ...` of a bad input.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from train.checkpointing import CheckpointSaveError, NoUsableCheckpointError
    from train.trainer import NonFiniteError

    try:
        _train()
    except InputError as error:
        _exit(error, 2)
    except (CheckpointSaveError, NoUsableCheckpointError, NonFiniteError) as error:
        _exit(error, 1)


def _train() -> None:
    from train.config import from_config_dict

    try:
        config = from_config_dict(_CONFIG.value)
    except OSError as error:  # a --config file that is missing or fails to load (read lazily)
        raise InputError(f"--config: {' '.join(str(error).split())}") from error
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    default = f"runs/{path.split('/')[-1].removesuffix('.py')}"
    if _WORKDIR.value == "":  # `--workdir=$DIR` with DIR unset: not the default's run
        raise InputError(f"--workdir is empty: name a directory, or leave it out for {default}")
    workdir = _WORKDIR.value or default
    import jax

    if _DISTRIBUTED.value:
        _initialize_distributed()
    elif given := _given(_PEER_FLAGS):
        raise InputError(f"{', '.join(given)} set without --distributed, which they are for")
    from train.hosts import fail_together
    from train.loop import run

    with fail_together():  # one process's error ends them all, not a hang in a collective
        summary = run(config, workdir)
    if jax.process_index() == 0:
        val = "n/a" if summary.val_loss is None else f"{summary.val_loss:.4f}"
        print(
            f"done: step {summary.step}, train loss {summary.train_loss:.4f}, validation loss "
            f"{val}, {summary.tokens_per_s:,.0f} tokens/s, {summary.seconds:.0f} s, "
            f"workdir {workdir}" + (" (stopped early)" if summary.stopped_early else "")
        )


_PEER_FLAGS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)


def _given(holders) -> list[str]:
    return [f"--{holder.name}" for holder in holders if holder.value is not None]


def _initialize_distributed() -> None:
    """`jax.distributed.initialize`; peers it cannot find (no flags, no cluster) are an
    `InputError` naming the flags."""
    import jax

    peers = _distributed_args()
    try:
        jax.distributed.initialize(**peers)
    except ValueError as error:  # JAX's "coordinator_address should be defined." and the like
        raise InputError(
            f"--distributed: {error} JAX found no cluster to take it from: pass "
            "--coordinator_address=host:port --num_processes=N --process_id=i on every host"
        ) from error


def _distributed_args() -> dict:
    """The peer flags for `jax.distributed.initialize`, checked (None: found by JAX)."""
    address, count, index = (holder.value for holder in _PEER_FLAGS)
    if address is not None and not address.rpartition(":")[2].isdigit():
        raise InputError(f"--coordinator_address={address} must be host:port")
    if count is not None and count < 1:
        raise InputError(f"--num_processes={count} must be >= 1")
    if index is not None and index < 0:
        raise InputError(f"--process_id={index} must be >= 0")
    if None not in (index, count) and index >= count:
        raise InputError(f"--process_id={index} must be < --num_processes={count}")
    return dict(coordinator_address=address, num_processes=count, process_id=index)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with the user's mistakes in flags (an unknown `--config.` key, a value
    that does not parse) reported as input errors rather than tracebacks."""
    try:
        argv = flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:  # ml_collections: a key the config lacks
        if "'get_config'" in str(error):  # ml_collections: a --config file of something else
            _exit("--config: the file defines no get_config() (a configs/*.py file does)", 2)
        while isinstance(error, BaseException) and error.args:  # it wraps a KeyError's text
            error = error.args[0]
        _exit(f"unknown config key {error}", 2)
    except Exception as error:  # flags.Error, ml_collections' ValueError / TypeError
        _exit(error, 2)
    if argv[1:]:  # `--config.data.add_bos False` leaves "False" here, and add_bos True
        _exit(
            f"unexpected argument(s) {' '.join(argv[1:])}: every flag is --name=value "
            "(--config.data.add_bos=False)",
            2,
        )
    return argv


def _exit(error: Exception | str, code: int) -> None:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
