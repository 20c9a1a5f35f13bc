"""Preflight: every file a run reads is checked before any work, all problems in one error.

A missing tokenizer, shard directory or initial checkpoint, a checkpoint of another
architecture, or a split without a usable document would otherwise surface minutes into a run
(after the mesh, the model and the compiles) as a traceback from deep inside a library.
`check_num_workers` checks the one data value that depends on the devices, once the mesh is
known and before the workdir is made.
"""

from __future__ import annotations

import dataclasses
import logging

from dga_jax.checkpoint import load_config
from dga_jax.data.config import DataConfig
from dga_jax.data.pipeline import check_split
from dga_jax.data.slimpajama import list_shards
from dga_jax.data.tokenizers import load_tokenizer
from dga_jax.errors import ConfigError, InputError
from dga_jax.model.config import ARCHITECTURE_FIELDS
from train.config import TrainConfig

# Model fields that shape no weight but change what the weights compute: the run takes
# config.model's, whatever the checkpoint was trained with.
NUMERIC_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "rotary_dim",
    "max_position",
    "norm_eps",
    "sliding_window",
)

CONVERT = "python -m dga_jax.checkpoint.convert hf-to-orbax --hf_dir <HF model dir> --out {}"


def check_inputs(config: TrainConfig) -> None:
    """Raises one `InputError` listing every input of `config` that is missing or unusable;
    once every file is there, each configured split must hold a usable document."""
    problems = [
        _check_init_checkpoint(config),
        _check_split(config, "train"),
        _check_split(config, "validation"),
        _check_tokenizer(config),
    ]
    problems = [problem for problem in problems if problem] or _check_documents(config)
    if problems:
        raise InputError("; ".join(problems))


def pipeline_config(config: TrainConfig) -> DataConfig:
    """The pipeline's config; no `data.train` means the sample corpus (built on first use)."""
    data = config.data
    return DataConfig(
        seq_len=data.seq_len,
        global_batch_size=config.train.global_batch_size,
        tokenizer=data.tokenizer,
        train=data.train or None,
        validation=data.validation or None,
        set_names=data.set_names,
        add_bos=data.add_bos,
        add_eos=data.add_eos,
        seed=data.seed,
        num_workers=data.num_workers,
        eval_batches=config.train.eval_batches,
    )


def _check_init_checkpoint(config: TrainConfig) -> str | None:
    path = config.init_checkpoint
    if not path:
        return None
    try:
        stored = load_config(path)
    except InputError as error:
        return f"config.init_checkpoint: {error}; make one with {CONVERT.format(path)}"
    changes = [
        f"{name}={getattr(stored, name)} (config: {getattr(config.model, name)}; "
        f"{_override_flags(name, getattr(stored, name), getattr(config.model, name))})"
        for name in ARCHITECTURE_FIELDS
        if getattr(stored, name) != getattr(config.model, name)
    ]
    if changes:
        return (
            f"config.init_checkpoint {path!r} holds another architecture than config.model: "
            + ", ".join(changes)
        )
    _warn_numeric_changes(path, stored, config)
    return None


def _warn_numeric_changes(path: str, stored, config: TrainConfig) -> None:
    """Says which `NUMERIC_FIELDS` the run changes from the checkpoint's (silently, otherwise: a
    deliberate change, such as a larger RoPE base, is allowed)."""
    for name in NUMERIC_FIELDS:
        ours, theirs = getattr(config.model, name), getattr(stored, name)
        if name == "sliding_window" and config.model.attention != "dense":
            continue  # DGA and the baselines replace dense attention, window and all
        if ours != theirs:
            logging.warning(
                "config.init_checkpoint %r was trained with %s=%s; the run trains with "
                "config.model's %s (%s keeps the checkpoint's)",
                path,
                name,
                theirs,
                ours,
                _override_flags(name, theirs, ours),
            )


def _override_flags(name: str, theirs, ours) -> str:
    """The command-line flags that set config.model's `name` to the checkpoint's value: one
    per differing field of a nested config (rope_scaling)."""
    if theirs is None:  # no flag takes None: the presets leave these fields unset
        return f"no --config.model.overrides.{name} flag"
    if not dataclasses.is_dataclass(theirs):
        return f"--config.model.overrides.{name}={theirs}"
    return " ".join(
        f"--config.model.overrides.{name}.{field.name}={getattr(theirs, field.name)}"
        for field in dataclasses.fields(theirs)
        if getattr(theirs, field.name) != getattr(ours, field.name)
    )


def check_num_workers(config: TrainConfig, rows: int) -> None:
    """A `ConfigError` unless `config.data.num_workers` divides the `rows` of the global batch
    this process reads (the mesh decides them: known once the devices are)."""
    workers = config.data.num_workers
    if workers and rows % workers:
        raise ConfigError(
            f"config.data.num_workers={workers} must divide the {rows} rows of each global batch "
            f"(config.train.global_batch_size={config.train.global_batch_size}) this process "
            "reads; 0 reads without worker processes"
        )


def _check_split(config: TrainConfig, split: str) -> str | None:
    pattern = getattr(config.data, split)
    if not pattern:
        other = "validation" if split == "train" else "train"
        if getattr(config.data, other):
            return f"config.data.{split} is not set (config.data.{other} is): set both or neither"
        return None
    try:
        list_shards(pattern)
    except InputError as error:
        return f"config.data.{split}: {error}"
    return None


def _check_documents(config: TrainConfig) -> list[str]:
    """Per configured split without a usable document, its problem: a validation split without
    one failed only at the first evaluation, after the steps before it, unsaved. Reads each
    split up to its first usable document."""
    data, problems = pipeline_config(config), []
    for split in ("train", "validation"):
        if getattr(config.data, split):
            try:
                check_split(data, split)
            except InputError as error:  # it names config.data.<split>
                problems.append(str(error))
    return problems


def _check_tokenizer(config: TrainConfig) -> str | None:
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except InputError as error:
        return f"config.data.tokenizer: {error}"
    name = f"config.data.tokenizer {config.data.tokenizer!r}"
    problems = [
        f"{name} has no {token} token to add: set --config.data.{key}=False"
        for key, token, token_id in (
            ("add_bos", "BOS", tokenizer.bos_id),
            ("add_eos", "EOS", tokenizer.eos_id),
        )
        if getattr(config.data, key) and token_id is None
    ]
    if tokenizer.vocab_size > config.model.vocab_size:
        problems.append(
            f"{name} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size={config.model.vocab_size}"
        )
    return "; ".join(problems) or None
