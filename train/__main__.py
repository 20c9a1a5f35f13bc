"""Entry point: `python -m train --config=configs/tiny_dga.py [--config.key=value] [--workdir=DIR]`.

Multi-host: `--distributed` calls `jax.distributed.initialize()` before anything touches the
devices; on TPU pods and SLURM/Kubernetes GPU clusters it finds its peers by itself, elsewhere
pass `--coordinator_address=host:port --num_processes=N --process_id=i` on every host.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

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
    from train.config import ConfigError, from_config_dict

    try:
        config = from_config_dict(_CONFIG.value)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from train.loop import run

    path = config_flags.get_config_filename(flags.FLAGS["config"])
    name = path.split("/")[-1].removesuffix(".py")
    workdir = _WORKDIR.value or f"runs/{name}"
    summary = run(config, workdir)
    if jax.process_index() == 0:
        val = "n/a" if summary.val_loss is None else f"{summary.val_loss:.4f}"
        print(
            f"done: step {summary.step}, train loss {summary.train_loss:.4f}, validation loss "
            f"{val}, {summary.tokens_per_s:,.0f} tokens/s, {summary.seconds:.0f} s, "
            f"workdir {workdir}" + (" (stopped early)" if summary.stopped_early else "")
        )


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
