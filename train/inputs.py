"""Preflight: every file a run reads is checked before any work, all problems in one error.

A missing tokenizer, shard directory or initial checkpoint, or a checkpoint of another
architecture, would otherwise surface minutes into a run (after the mesh, the model and the
compiles) as a traceback from deep inside a library.
"""

from __future__ import annotations

from dga_jax.checkpoint import load_config
from dga_jax.data.slimpajama import list_shards
from dga_jax.data.tokenizers import load_tokenizer
from dga_jax.errors import InputError
from dga_jax.model.config import ARCHITECTURE_FIELDS
from train.config import TrainConfig

CONVERT = "python -m dga_jax.checkpoint.convert hf-to-orbax --hf_dir <HF model dir> --out {}"


def check_inputs(config: TrainConfig) -> None:
    """Raises one `InputError` listing every input of `config` that is missing or unusable."""
    problems = [
        _check_init_checkpoint(config),
        _check_split(config, "train"),
        _check_split(config, "validation"),
        _check_tokenizer(config),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise InputError("; ".join(problems))


def _check_init_checkpoint(config: TrainConfig) -> str | None:
    path = config.init_checkpoint
    if not path:
        return None
    try:
        stored = load_config(path)
    except InputError as error:
        return f"config.init_checkpoint: {error}; make one with {CONVERT.format(path)}"
    changes = [
        f"{name}={getattr(stored, name)} (config: {getattr(config.model, name)})"
        for name in ARCHITECTURE_FIELDS
        if getattr(stored, name) != getattr(config.model, name)
    ]
    if changes:
        return (
            f"config.init_checkpoint {path!r} holds another architecture than config.model: "
            + ", ".join(changes)
        )
    return None


def _check_split(config: TrainConfig, split: str) -> str | None:
    pattern = getattr(config.data, split)
    if not pattern:
        if split == "validation" and config.data.train:
            return "config.data.validation is not set (config.data.train is): set both or neither"
        return None
    try:
        list_shards(pattern)
    except InputError as error:
        return f"config.data.{split}: {error}"
    return None


def _check_tokenizer(config: TrainConfig) -> str | None:
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except InputError as error:
        return f"config.data.tokenizer: {error}"
    if tokenizer.vocab_size > config.model.vocab_size:
        return (
            f"config.data.tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} ids, "
            f"more than the model's vocab_size={config.model.vocab_size}"
        )
    return None
