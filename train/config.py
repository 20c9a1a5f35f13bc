"""The boundary between a `configs/*.py` ConfigDict and the library's frozen dataclasses.

Everything is checked here, before any work: an unknown key, a value of the wrong type or a
required input left unset raises `ConfigError` naming the key (`config.optim.lerning_rate`).
Experiments mark their required inputs (`INPUTS`) with `config_dict.placeholder(str)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from dga_jax import ModelConfig, strict
from dga_jax.errors import ConfigError
from dga_jax.ops.dga.sharded import CONTEXT_ORDERS, STRATEGIES
from dga_jax.sharding import MESH_AXES, mesh_shape


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, seq, tensor); one axis may be -1: all remaining devices.

    `context_parallel`: how attention treats a sequence split over `seq` (the model's
    `context_parallel`: "auto", "ulysses" or "dga"); `context_order`: "contiguous", or "zigzag"
    to balance causal work (the batches' rows are permuted once, the model follows). README,
    "Long sequences across devices".
    """

    data: int = 1
    fsdp: int = -1
    seq: int = 1
    tensor: int = 1
    context_parallel: str = "auto"
    context_order: str = "contiguous"

    def __post_init__(self):
        for key, allowed in (("context_parallel", STRATEGIES), ("context_order", CONTEXT_ORDERS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"config.mesh.{key} must be one of {allowed}, got {getattr(self, key)!r}"
                )

    def shape(self, device_count: int) -> tuple[int, int, int, int]:
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        return mesh_shape(sizes, device_count, "config.mesh")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then constant or cosine decay; clipping; non-finite guard."""

    learning_rate: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    end_learning_rate_factor: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    max_nonfinite_steps: int = 5

    def __post_init__(self):
        for key, bad, rule in _OPTIM_RANGES:
            if bad(getattr(self, key)):
                raise ConfigError(f"config.optim.{key} must be {rule}, got {getattr(self, key)}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                f"config.optim.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}"
            )
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"config.optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}"
            )


def _not_positive(value: float) -> bool:
    return not 0 < value < math.inf


def _not_a_norm(value: float) -> bool:
    return not value > 0


def _negative(value: float) -> bool:
    return not 0 <= value < math.inf


def _not_a_fraction(value: float) -> bool:
    return not 0 <= value <= 1


def _not_a_decay_rate(value: float) -> bool:
    return not 0 <= value < 1


# OptimConfig values outside which a run trains wrongly without failing: clipping to a norm of 0
# zeroes every gradient, a learning rate <= 0 stands still or ascends, an infinite eps zeroes
# every Adam step, an infinite learning rate or weight decay makes every weight inf after one
# step, an end factor above 1 anneals upwards, and so on. An infinite clipping norm: no clipping.
_OPTIM_RANGES = (
    ("learning_rate", _not_positive, "> 0 and finite"),
    ("warmup_steps", _negative, ">= 0"),
    ("end_learning_rate_factor", _not_a_fraction, "in [0, 1] (a fraction of learning_rate)"),
    ("weight_decay", _negative, ">= 0 and finite"),
    ("b1", _not_a_decay_rate, "in [0, 1)"),
    ("b2", _not_a_decay_rate, "in [0, 1)"),
    ("eps", _not_positive, "> 0 and finite"),
    ("grad_clip_norm", _not_a_norm, "> 0 (a norm of 0 zeroes every gradient)"),
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The `train` section: length, batch, cadence of logging, evaluation and checkpoints."""

    steps: int = 200
    global_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    peak_flops_per_device: float = 0.0
    wandb_project: str = ""
    profile_steps: str = ""  # "first,last": a jax.profiler trace of those steps (train.profiler)
    loss_chunks: int = 1  # the LM head on T / loss_chunks positions at a time (token_losses)

    def __post_init__(self):
        for name in (
            "steps",
            "global_batch_size",
            "grad_accum_steps",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "loss_chunks",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"config.train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"config.train.grad_accum_steps={self.grad_accum_steps}"
            )
        if not -(2**63) <= self.seed < 2**63:  # JAX's key takes an int64; a traceback past it
            raise ConfigError(f"config.train.seed must fit in int64, got {self.seed}")
        if not 0 <= self.peak_flops_per_device < math.inf:  # 0: guessed from the device kind
            raise ConfigError(
                "config.train.peak_flops_per_device must be >= 0 and finite (0: guess from the "
                f"device kind), got {self.peak_flops_per_device}"
            )
        parse_profile_steps(self.profile_steps, self.steps)

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """`profile_steps` as (first, last), 1-based and inclusive; None when empty."""
        return parse_profile_steps(self.profile_steps, self.steps)


def parse_profile_steps(text: str, steps: int) -> tuple[int, int] | None:
    """`first,last` -> (first, last) within 1..steps; empty -> None; else a `ConfigError`."""
    if not text.strip():
        return None
    parts = text.split(",")
    try:
        first, last = (int(part) for part in parts)
    except ValueError:
        first = last = 0
    if not 1 <= first <= last <= steps:
        raise ConfigError(
            f"config.train.profile_steps must be 'first,last' with 1 <= first <= last <= "
            f"config.train.steps={steps}, got {text!r}"
        )
    return first, last


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The `data` section; turned into the pipeline's `DataConfig` by the loop.

    `add_bos` / `add_eos`: wrap each document in the tokenizer's BOS / EOS ids (a GPT-2 style
    tokenizer has no BOS: set `add_bos=False`). `num_workers` must also divide the rows of the
    global batch each process reads (checked by `train.inputs.check_num_workers`).
    """

    train: str = ""
    validation: str = ""
    tokenizer: str = "byte"
    seq_len: int = 256
    set_names: tuple[str, ...] = ()
    add_bos: bool = True
    add_eos: bool = True
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"config.data.seq_len must be >= 1, got {self.seq_len}")
        if self.num_workers < 0:
            raise ConfigError(
                f"config.data.num_workers must be >= 0 (0: no worker processes), got "
                f"{self.num_workers}"
            )


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The `model` section: a `ModelConfig` preset and field overrides (nested for `dga`,
    `rope_scaling`)."""

    preset: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataSection
    mesh: MeshConfig
    optim: OptimConfig
    train: RunConfig
    init_checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class _Sections:
    """A config file's sections as written, before the model section becomes a ModelConfig."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: RunConfig = RunConfig()
    init_checkpoint: str = ""


# The inputs a config may leave for the command line (`config_dict.placeholder(str)`: None until
# set), and where each comes from.
INPUTS = {
    "init_checkpoint": "DIR, a converted checkpoint: python -m dga_jax.checkpoint.convert "
    "hf-to-orbax --hf_dir <HF model dir> --out DIR",
    "data.train": "PATH, a directory or glob of SlimPajama train shards (.jsonl.zst/.parquet)",
    "data.validation": "PATH, a directory or glob of SlimPajama validation shards",
    "data.tokenizer": "FILE, the model's tokenizer.model or tokenizer.json",
}


def from_config_dict(config: Any) -> TrainConfig:
    """Checks and converts a ConfigDict (or nested dict) into a `TrainConfig`; every required
    input left unset is named in one `ConfigError`."""
    values = _to_dict(config)
    unset = [key for key in INPUTS if _lookup(values, key) is None]
    if unset:
        raise ConfigError(
            "required input(s) not set: "
            + "; ".join(f"--config.{key}={INPUTS[key]}" for key in unset)
        )
    sections = strict.build(_Sections, values, "config.")
    mesh_keys = ("context_parallel", "context_order")  # the mesh section sets them for the model
    for key in mesh_keys:
        if sections.model.overrides.get(key) is not None:
            raise ConfigError(f"config.model.overrides.{key}: set config.mesh.{key} instead")
    try:
        model = _model_config(sections.model.preset, sections.model.overrides)
        model = model.replace(**{key: getattr(sections.mesh, key) for key in mesh_keys})
    except ValueError as error:  # a preset name or a cross-field rule of ModelConfig
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"config.model: {error}") from error
    if model.attention in UNTRAINABLE_KINDS:
        raise ConfigError(
            f"config.model.overrides.attention={model.attention!r} has no gradient (a "
            "training-free prefill method): train with attention 'dense' or 'dga' and evaluate "
            "under it"
        )
    _check_positions(sections.data.seq_len, model)
    optim, steps = sections.optim, sections.train.steps
    if optim.warmup_steps >= steps:  # a warning: short test and smoke runs keep the defaults
        logging.warning(
            "config.optim.warmup_steps=%d >= config.train.steps=%d: the learning rate never "
            "reaches config.optim.learning_rate=%g, nor decays",
            optim.warmup_steps,
            steps,
            optim.learning_rate,
        )
    fields = {f.name: getattr(sections, f.name) for f in dataclasses.fields(_Sections)}
    return TrainConfig(**{**fields, "model": model})


def _check_positions(seq_len: int, model: ModelConfig) -> None:
    """Training rows past the model's max_position would teach positions its exported config
    disowns (generation refuses them: `dga_jax.generate.check_context`). StreamingLLM and
    LM-Infinite cap every RoPE distance by their window: any length is theirs."""
    if not model.positions_fit(seq_len):
        raise ConfigError(
            f"config.data.seq_len={seq_len} is past the model's max_position="
            f"{model.max_position}: set --config.model.overrides.max_position={seq_len} (with "
            "rope_scaling, if the checkpoint was trained shorter) to train at that length"
        )


# Attention kinds that the model runs but cannot train (dga_jax.ops.minference: no backward).
UNTRAINABLE_KINDS = ("minference",)


def _model_config(preset: str, overrides: dict[str, Any]) -> ModelConfig:
    """The preset with the overrides that are set (an unset one, None, keeps the preset's)."""
    merged = ModelConfig.preset(preset).to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            merged[key] = value
    return strict.build(ModelConfig, merged, "config.model.overrides.")


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    """`values["a"]["b"]` for "a.b"; "" when absent (only a placeholder left unset is None)."""
    for key in dotted.split("."):
        if not isinstance(values, dict) or key not in values:
            return ""
        values = values[key]
    return values


def _to_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: _to_dict(v) if isinstance(v, dict) else v for k, v in dict(config).items()}
