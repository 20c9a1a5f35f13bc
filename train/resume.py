"""What a resumed run must keep of the config it resumes, and the record checkpoints store.

A checkpoint stores its run's config as a `flat_record`; `resume_changes` compares a new run's
config with it: a change of the data order or the model's shapes is refused (`RESUME_FIXED`),
anything else is listed for the log.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dga_jax.errors import ConfigError
from dga_jax.model.config import ARCHITECTURE_FIELDS
from train.config import TrainConfig

# What a resumed run must keep: the data order (which tokens each step sees) and the shapes of
# the parameters. Anything else (steps, learning rate, cadence, mesh, attention) may change.
# The data path may too: the saved position names the shard files it indexes (a fingerprint of
# their names relative to their directory, and of their sizes), which the data iterator checks,
# so a data set moved whole (a copy on a faster disk, another cluster's mount) resumes, and
# other files are refused.
RESUME_FIXED = (
    "data.tokenizer",
    "data.seq_len",
    "data.set_names",
    "data.add_bos",
    "data.add_eos",
    "data.seed",
    "train.global_batch_size",
    *(f"model.{name}" for name in ARCHITECTURE_FIELDS),
)

# Keys added to the config since older checkpoints were written, with the value those runs had.
ADDED_KEYS = {
    "data.add_bos": True,
    "data.add_eos": True,
    "train.loss_chunks": 1,
    "model.scan_layers": True,
    "model.qkv_bias": False,
    "model.qk_norm": False,
    "model.o_bias": False,
    "model.hf_model_type": None,
    "model.rotary_dim": None,
    "model.rope_scaling.beta_fast": 32.0,
    "model.rope_scaling.beta_slow": 1.0,
    "model.rope_scaling.truncate": True,
    "model.rope_scaling.short_factor": [],
    "model.rope_scaling.long_factor": [],
}


def flat_record(config: TrainConfig) -> dict[str, Any]:
    """`config` as JSON values keyed by dotted names (`data.seq_len`), as checkpoints store it."""
    flat: dict[str, Any] = {}

    def walk(values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(json.loads(json.dumps(dataclasses.asdict(config))), "")
    return flat


def resume_changes(stored: dict[str, Any], config: TrainConfig, source: str) -> list[str]:
    """`key: old -> new` for each key `config` changes from the `stored` `flat_record` of the
    run it resumes. A change of a `RESUME_FIXED` key raises one `ConfigError` naming them all."""
    current = flat_record(config)
    stored = {**ADDED_KEYS, **stored}
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    described = {k: f"config.{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed}
    fixed = [described[k] for k in changed if k in RESUME_FIXED]
    if fixed:
        raise ConfigError(
            f"{source} was written with another data order or model: {'; '.join(fixed)}. A "
            "resumed run must keep them; start a new run in another --workdir (with "
            "--config.init_checkpoint for the weights) instead"
        )
    return [described[k] for k in changed]
