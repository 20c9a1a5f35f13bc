"""Orbax checkpoints of a `Llama`: its parameters and its `ModelConfig`, in one directory.

Layout: one Orbax composite checkpoint (`ocp.CompositeCheckpointHandler`) with two items,

    ckpt_dir/params/        the `nnx.Param` state as a nested dict (`nnx.to_pure_dict`), OCDBT;
                            the PyTree format `StandardSave` writes (`StandardRestore` reads it)
    ckpt_dir/model_config/  `ModelConfig.to_dict()` as JSON

which is the layout of one step directory of an `ocp.CheckpointManager` managing items named
`params` and `model_config`, so `load_model(root / str(step))` loads a step of one. Loading needs
only the directory. Orbax writes into a temporary sibling and renames it at the end: an
interrupted save leaves no directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from dga_jax import strict
from dga_jax.checkpoint.hf import CheckpointError
from dga_jax.checkpoint.hf_weights import Path, param_shapes
from dga_jax.errors import ConfigError, InputError, MissingInputError
from dga_jax.model.config import BASELINE_KINDS, ModelConfig
from dga_jax.model.llama import Llama
from dga_jax.sharding import DEFAULT_RULES, LogicalRules

PARAMS = "params"
CONFIG = "model_config"
# Orbax's temporary sibling of a checkpoint being saved: `<dir>.orbax-checkpoint-tmp[-<time>]`.
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def save_params(ckpt_dir: str | os.PathLike, config: ModelConfig, params: dict[str, Any]) -> None:
    """Writes `params` (nested dict of numpy or jax arrays, as `nnx.to_pure_dict` gives) and
    `config` to a new directory `ckpt_dir`. Parameters that are not exactly those of
    `Llama(config)`, in its shapes, are a `CheckpointError`: nothing could load them."""
    path = os.path.abspath(ckpt_dir)
    if os.path.exists(path):
        raise FileExistsError(f"checkpoint directory already exists: {path}")
    found = {key: np.shape(leaf) for key, leaf in traverse_util.flatten_dict(params).items()}
    check_shapes(found, param_shapes(config), "the parameters to save", "the model config")
    items = {PARAMS: ocp.args.PyTreeSave(params), CONFIG: ocp.args.JsonSave(config.to_dict())}
    try:
        with contextlib.closing(_saver()) as checkpointer:
            checkpointer.save(path, ocp.args.Composite(**items))
    except BaseException:
        _remove_partial(path)
        raise


def _remove_partial(path: str, quiet: float = 0.5, limit: float = 30.0) -> None:
    """Deletes the temporary directory a failed save of `path` leaves behind. The writer threads
    of the items that had not failed may still be adding files to it after the error (and so
    create it again): it is removed until it stays gone for `quiet` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        partial = glob.glob(glob.escape(path) + ORBAX_TMP_SUFFIX + "*")
        for tmp in partial:
            shutil.rmtree(tmp, ignore_errors=True)
        if not partial:
            time.sleep(quiet)
            if not glob.glob(glob.escape(path) + ORBAX_TMP_SUFFIX + "*"):
                return


def _saver() -> ocp.Checkpointer:
    """Writes the params item as `StandardSave` would, but numpy arrays without copying them
    first: Orbax's default numpy handler deep-copies every host array, which for a converted
    7B model would be a second copy of the weights."""
    types = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    params = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    handlers.add(PARAMS, ocp.args.PyTreeSave, params)
    handlers.add(CONFIG, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handlers))


def save_model(model: Llama, ckpt_dir: str | os.PathLike) -> None:
    """Writes a model's parameters (sharded arrays are written shard by shard) and config."""
    save_params(ckpt_dir, model.config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` stored in a checkpoint directory; a damaged one (not JSON, not a valid
    config) is an `InputError` naming its item directory."""
    try:
        return ModelConfig.from_dict(_restore(ckpt_dir, {CONFIG: ocp.args.JsonRestore()})[CONFIG])
    except MissingInputError:
        raise
    except (ValueError, FileNotFoundError) as error:
        item = os.path.join(os.path.abspath(ckpt_dir), CONFIG)
        raise InputError(f"{item} holds no readable model config: {error}") from error


def load_model(
    ckpt_dir: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    **config_changes: Any,
) -> Llama:
    """A `Llama` restored from `ckpt_dir`, each array read straight onto its devices.

    With a `mesh`, every parameter is sharded as `rules` maps its logical axes; without one it
    lands on the default device. `config_changes` replace fields of the stored config, e.g.
    `attention="dga", dga=DGAConfig(16, 0.1)`; a changed `param_dtype` casts on restore. Stored
    parameters that the (changed) config does not give, in its shapes, are a `CheckpointError`
    naming the first that differs.
    """
    config = load_config(ckpt_dir).replace(**config_changes)
    graphdef, params, rest = abstract_model(config, rules, mesh)
    target = nnx.to_pure_dict(params)
    expected = {key: leaf.shape for key, leaf in traverse_util.flatten_dict(target).items()}
    changed = f" changed by {sorted(config_changes)}" if config_changes else ""
    check_stored(ckpt_dir, expected, "the model config" + changed)
    restored = _restore_params(ckpt_dir, ocp.args.StandardRestore(target))
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def attention_changes(
    ckpt_dir: str | os.PathLike,
    attention: str | None = None,
    *,
    selection: str | None = None,
    group_size: int | None = None,
    focal_ratio: float | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`load_model`'s config changes that evaluate a checkpoint under another attention: the
    kind, the DGA fields given (None keeps the stored value), and `settings`, fields of the
    kind's own config for the baselines (`{"recent_size": 1000}` for "streaming_llm"). A
    changed kind also resets `attention_impl` to its default, since an implementation names one
    kind's backend (a dense checkpoint trained with "blockwise" is evaluated with DGA's), and
    drops a dense model's sliding window, which DGA and the baselines replace."""
    stored = load_config(ckpt_dir)
    changes: dict[str, Any] = {}
    if attention is not None and attention != stored.attention:
        changes.update(attention=attention, attention_impl=None)
        if attention != "dense" and stored.sliding_window is not None:
            changes["sliding_window"] = None  # dense attention's: the new kind replaces it
    given = dict(selection=selection, group_size=group_size, focal_ratio=focal_ratio)
    dga = {name: value for name, value in given.items() if value is not None}
    if dga:
        changes["dga"] = dataclasses.replace(stored.dga, **dga)
    if settings:
        kind = attention or stored.attention
        if kind not in BASELINE_KINDS:
            raise ConfigError(
                f"attention settings {sorted(settings)} are fields of {BASELINE_KINDS}, not of "
                f"attention {kind!r}"
            )
        current = dataclasses.asdict(getattr(stored, kind))
        changes[kind] = strict.build(
            type(getattr(stored, kind)), {**current, **settings}, kind + "."
        )
    return changes


def parse_settings(text: str, flag: str) -> dict[str, int]:
    """`name=value` pairs, comma- or semicolon-separated (lm_eval's model_args split at commas)
    -> {name: int value}; a `ConfigError` naming `flag` for anything else."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        name, _, value = item.partition("=")
        try:
            settings[name.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"{flag}: give name=integer pairs, got {item!r}") from None
    return settings


def abstract_model(
    config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, mesh: jax.sharding.Mesh | None = None
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`Llama(config, rules)` with no memory allocated: graphdef, its `nnx.Param` state as
    `jax.ShapeDtypeStruct`s carrying their target shardings, and the other (abstract) state."""

    def build() -> Llama:
        return Llama(config, rules, rngs=nnx.Rngs(0))

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
        if mesh is None:
            shardings = jax.tree.map(_default_device, params)
        else:
            shardings = nnx.get_named_sharding(params, mesh)
        params = jax.tree.map(_with_sharding, params, shardings)
    return graphdef, params, rest


def _default_device(leaf: jax.ShapeDtypeStruct) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _with_sharding(
    leaf: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding
) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def read_param(ckpt_dir: str | os.PathLike, path: tuple[str, ...]) -> np.ndarray:
    """One parameter (e.g. `("layers", "attn", "q")`) read into host memory, in its stored dtype;
    no other parameter is read. One the checkpoint lacks is a `CheckpointError`."""
    if tuple(path) not in stored_shapes(ckpt_dir):
        item_dir = os.path.join(os.path.abspath(ckpt_dir), PARAMS)
        raise CheckpointError(f"{item_dir} holds no parameter {'.'.join(path)!r}")
    item: Any = ocp.RestoreArgs(restore_type=np.ndarray)
    for key in reversed(path):
        item = {key: item}
    args = ocp.args.PyTreeRestore(item=item, restore_args=item, partial_restore=True)
    restored = _restore_params(ckpt_dir, args)
    for key in path:
        restored = restored[key]
    return restored


def stored_shapes(ckpt_dir: str | os.PathLike) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of each parameter a checkpoint holds, from its metadata (no array is read)."""
    item_dir = os.path.join(_checkpoint_path(ckpt_dir, [PARAMS]), PARAMS)
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        try:
            metadata = handler.metadata(pathlib.Path(item_dir))
        except Exception as error:  # files gone, damaged JSON (_METADATA), TensorStore's errors
            raise _unreadable(item_dir, error) from error
    flat = traverse_util.flatten_dict(metadata.tree)
    return {key: tuple(leaf.shape) for key, leaf in flat.items()}


def check_stored(
    ckpt_dir: str | os.PathLike, expected: dict[Path, tuple[int, ...]], source: str
) -> None:
    """The checkpoint holds exactly the parameters `expected` (path -> shape, given by
    `source`), in those shapes; else a `CheckpointError` naming its params item."""
    item_dir = os.path.join(os.path.abspath(ckpt_dir), PARAMS)
    check_shapes(stored_shapes(ckpt_dir), expected, item_dir, source)


def check_shapes(
    found: dict[Path, tuple[int, ...]],
    expected: dict[Path, tuple[int, ...]],
    where: str,
    source: str,
) -> None:
    """`found` holds the parameters of `expected` (path -> shape, given by `source`), no other,
    in the same shapes; else a `CheckpointError` naming `where` and what differs."""
    missing = sorted(".".join(key) for key in expected if key not in found)
    if missing:
        raise CheckpointError(f"{where}: missing parameter(s) {missing} of {source}")
    unexpected = sorted(".".join(key) for key in found if key not in expected)
    if unexpected:
        raise CheckpointError(f"{where}: parameter(s) {unexpected} not in {source}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(
                f"{where}: parameter {'.'.join(key)!r} has shape {tuple(found[key])}; "
                f"{source} gives {tuple(shape)}"
            )


def _checkpoint_path(ckpt_dir: str | os.PathLike, items: list[str]) -> str:
    """The absolute path of a checkpoint directory that has the `items`."""
    path = os.path.abspath(ckpt_dir)
    if not os.path.isdir(path):
        raise MissingInputError(f"no checkpoint directory at {path}")
    missing = [item for item in items if not os.path.isdir(os.path.join(path, item))]
    if missing:
        raise MissingInputError(f"{path} is not a model checkpoint: it has no {missing} item")
    return path


def _restore_params(ckpt_dir: str | os.PathLike, args: ocp.args.CheckpointArgs) -> Any:
    """The params item as `args` restore it. Array data Orbax cannot read (files truncated or
    gone) is a `CheckpointError` naming the item, not TensorStore's bare `Exception`."""
    try:
        return _restore(ckpt_dir, {PARAMS: args})[PARAMS]
    except InputError:
        raise
    except Exception as error:  # TensorStore raises bare Exceptions, Orbax ValueErrors
        raise _unreadable(os.path.join(os.path.abspath(ckpt_dir), PARAMS), error) from error


def _unreadable(item_dir: str, error: Exception) -> CheckpointError:
    """The error for a params item whose files are gone or damaged, with `error`'s first line."""
    lines = str(error).splitlines() or [""]
    reason = f"{type(error).__name__}: {lines[0][:300]}"
    return CheckpointError(
        f"{item_dir} cannot be read ({reason}): the checkpoint is damaged or incomplete"
    )


def _restore(ckpt_dir: str | os.PathLike, items: dict[str, ocp.args.CheckpointArgs]) -> Any:
    path = _checkpoint_path(ckpt_dir, list(items))
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as checkpointer:
        return checkpointer.restore(path, ocp.args.Composite(**items))
