"""The boundary between a `configs/*.py` ConfigDict and the library's frozen dataclasses.

Everything is checked here, before any work: an unknown key, a missing section or a value of the
wrong type raises `ConfigError` naming the key (`config.optim.lerning_rate`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from dga_jax import ModelConfig
from dga_jax.sharding import MESH_AXES


class ConfigError(ValueError):
    """A config key is unknown, missing, or has the wrong type."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, seq, tensor); one axis may be -1: all remaining devices."""

    data: int = 1
    fsdp: int = -1
    seq: int = 1
    tensor: int = 1

    def shape(self, device_count: int) -> tuple[int, int, int, int]:
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"config.mesh: sizes must be >= 1, at most one -1; got {sizes}")
        if -1 in sizes:
            rest = -math.prod(sizes)
            if device_count % rest:
                raise ConfigError(f"config.mesh {sizes} does not divide {device_count} devices")
            sizes[sizes.index(-1)] = device_count // rest
        if math.prod(sizes) != device_count:
            raise ConfigError(
                f"config.mesh {sizes} needs {math.prod(sizes)} devices, have {device_count}"
            )
        return tuple(sizes)


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
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                f"config.optim.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}"
            )
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"config.optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}"
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
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"config.train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"config.train.grad_accum_steps={self.grad_accum_steps}"
            )


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The `data` section; turned into the pipeline's `DataConfig` by the loop."""

    train: str = ""
    validation: str = ""
    tokenizer: str = "byte"
    seq_len: int = 256
    set_names: tuple[str, ...] = ()
    num_workers: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataSection
    mesh: MeshConfig
    optim: OptimConfig
    train: RunConfig
    init_checkpoint: str = ""


def from_config_dict(config: Any) -> TrainConfig:
    """Checks and converts a ConfigDict (or nested dict) into a `TrainConfig`."""
    values = _to_dict(config)
    _reject_unknown(
        values, {"model", "data", "mesh", "optim", "train", "init_checkpoint"}, "config."
    )
    model = values.get("model", {})
    _reject_unknown(model, {"preset", "overrides"}, "config.model.")
    try:
        model_config = _model_config(model.get("preset", "tiny"), model.get("overrides", {}))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.model: {error}") from error
    return TrainConfig(
        model=model_config,
        data=_strict(DataSection, values.get("data", {}), "config.data."),
        mesh=_strict(MeshConfig, values.get("mesh", {}), "config.mesh."),
        optim=_strict(OptimConfig, values.get("optim", {}), "config.optim."),
        train=_strict(RunConfig, values.get("train", {}), "config.train."),
        init_checkpoint=_check_type(
            "config.init_checkpoint", values.get("init_checkpoint", ""), str
        ),
    )


def _model_config(preset: str, overrides: dict[str, Any]) -> ModelConfig:
    merged = ModelConfig.preset(preset).to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return ModelConfig.from_dict(merged)


def _to_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: _to_dict(v) if isinstance(v, dict) else v for k, v in dict(config).items()}


def _reject_unknown(values: dict[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}"
        )


def _strict(kind, values: dict[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(kind)}
    _reject_unknown(values, set(fields), prefix)
    hints = typing.get_type_hints(kind)
    checked = {k: _check_type(prefix + k, v, hints[k]) for k, v in values.items()}
    return kind(**checked)


def _check_type(key: str, value: Any, expected) -> Any:
    """`value` as `expected` (int, float, str, bool, tuple[str, ...]) or a ConfigError."""
    origin = typing.get_origin(expected)
    if origin is tuple or expected is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a tuple, got {value!r}")
        return tuple(_check_type(key, v, str) for v in value)
    if origin in (typing.Union, types.UnionType):
        expected = tuple(typing.get_args(expected))
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, float))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{key} must be {name}, got {type(value).__name__} {value!r}")
    return value
