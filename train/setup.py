"""A run's shapes and shardings, from its config alone: mesh, abstract sharded state, optimizer,
batch layout, the jitted step, and that step lowered without weights or data (`lower_train_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dga_jax import DEFAULT_RULES, Llama, make_mesh
from dga_jax.errors import ConfigError
from dga_jax.model.config import BASELINE_KINDS
from dga_jax.ops.dense import SPLIT_IMPLEMENTATIONS
from dga_jax.ops.dga.sharded import axis_names, choose_strategy, shard_count
from train.batches import addressed_rows
from train.config import TrainConfig
from train.step import TrainState, make_optimizer, train_step, weight_decay_mask


@dataclasses.dataclass
class Setup:
    """What every step of a run shares; built from the config and the devices alone."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: TrainState
    shardings: TrainState
    batch_sharding: NamedSharding  # of [accum, B / accum, T] batches
    batch_shape: tuple[int, int, int]
    rows: list[int]  # global batch rows this process's devices hold
    row_order: np.ndarray  # [T] position of each column of a batch (`Llama.row_positions`)
    loss_chunks: int  # config.train.loss_chunks


def lower_train_step(config: TrainConfig, devices: Sequence[jax.Device]) -> jax.stages.Lowered:
    """`config`'s train step on a mesh of `devices`, lowered from abstract state and batch.

    No weights or data are touched: compile the result for a topology's compile-only devices
    (`dga_jax.aot`) to see whether a recipe fits a TPU or GPU slice, and its memory per device.
    """
    setup = make_setup(config, devices)
    batch = {
        key: jax.ShapeDtypeStruct(setup.batch_shape, jnp.int32, sharding=setup.batch_sharding)
        for key in ("inputs", "targets")
    }
    with jax.set_mesh(setup.mesh):
        return step_fn(setup).trace(setup.abstract_state, batch).lower()


def step_fn(setup: Setup):
    """The jitted train step: the state is donated and keeps its shardings."""
    return jax.jit(
        functools.partial(train_step, setup.graphdef, setup.tx, loss_chunks=setup.loss_chunks),
        donate_argnums=0,
        out_shardings=(setup.shardings, None),
    )


def make_setup(config: TrainConfig, devices: Sequence[jax.Device] | None = None) -> Setup:
    """`config`'s setup on a mesh of `devices` (default: all of them); nothing is allocated."""
    devices = jax.devices() if devices is None else devices
    mesh = make_mesh(config.mesh.shape(len(devices)), devices=devices)
    check_mesh_fits(config, mesh)
    with jax.set_mesh(mesh):
        abstract_model = nnx.eval_shape(functools.partial(new_model, config))
        graphdef, abstract_params = nnx.split(abstract_model)
        tx = make_optimizer(config.optim, config.train.steps, weight_decay_mask(abstract_params))
        param_shardings = nnx.get_named_sharding(abstract_params, mesh)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        row_order = abstract_model.row_positions(config.data.seq_len)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx,
        _same_sharding,
        abstract_opt,
        param_shardings,
        transform_non_params=functools.partial(_constant, replicated),
    )
    shardings = TrainState(replicated, param_shardings, opt_shardings, replicated, replicated)
    abstract_state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        abstract_params,
        abstract_opt,
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    abstract_state = jax.tree.map(_with_sharding, abstract_state, shardings)
    batch_axes = DEFAULT_RULES.spec(("batch", "seq"))
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_axes))
    accum, rows = config.train.grad_accum_steps, config.train.global_batch_size
    batch_shape = (accum, rows // accum, config.data.seq_len)
    return Setup(
        mesh,
        graphdef,
        tx,
        abstract_state,
        shardings,
        batch_sharding,
        batch_shape,
        addressed_rows(batch_sharding, batch_shape),
        row_order,
        config.train.loss_chunks,
    )


def check_mesh_fits(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """A `ConfigError` naming the keys unless `mesh` evenly splits what `DEFAULT_RULES` put on
    it: each micro-batch's rows, the sequence (2 pieces per device in zig-zag order), the
    model's weights, the KV heads `config.mesh.context_parallel` needs, and each device's
    tokens into `config.train.loss_chunks` slices; dense attention over a sequence the "dga"
    strategy splits must run "blockwise". The baselines (`BASELINE_KINDS`) attend whole
    sequences: they refuse a split one."""
    _check_whole_sequences(config, mesh)
    accum, rows = config.train.grad_accum_steps, config.train.global_batch_size
    zigzag = config.mesh.context_order == "zigzag"
    sizes = (
        (
            f"config.train.global_batch_size / grad_accum_steps = {rows} / {accum}",
            rows // accum,
            "batch",
        ),
        ("config.data.seq_len", config.data.seq_len, "seq"),
        *(
            (f"config.model's {key}", getattr(config.model, key), axis)
            for key, axis in _WEIGHT_AXES
        ),
    )
    for what, size, logical in sizes:
        axes, parts = _mesh_parts(mesh, logical)
        how = " x ".join(f"config.mesh.{axis}={mesh.shape[axis]}" for axis in axes)
        pieces, pieces_how = parts, how
        if logical == "seq" and zigzag and parts > 1:
            pieces, pieces_how = 2 * parts, f"2 x {how} (config.mesh.context_order='zigzag')"
        if size % pieces:
            raise ConfigError(f"{what} = {size} must be a multiple of {pieces_how} = {pieces}")
        # The loss slices a device's share of the columns (both zig-zag pieces alike).
        if logical == "seq" and (size // parts) % config.train.loss_chunks:
            raise ConfigError(
                f"config.data.seq_len = {size} in {parts} piece(s) ({how}): "
                f"each piece's {size // parts} tokens must be a multiple of "
                f"config.train.loss_chunks={config.train.loss_chunks}"
            )
    heads, seq = (DEFAULT_RULES.spec((name,))[0] for name in ("kv_heads", "seq"))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        kv_heads = config.model.num_kv_heads // shard_count(heads)
        try:
            strategy = choose_strategy(
                config.mesh.context_parallel, kv_heads, config.data.seq_len, seq
            )
        except ValueError as error:
            raise ConfigError(f"config.mesh.context_parallel: {error}") from error
        parts = shard_count(seq)
    if parts > 1 and strategy == "dga":
        _check_split_dense(config, ulysses_fits=kv_heads % parts == 0)


def _check_split_dense(config: TrainConfig, ulysses_fits: bool) -> None:
    """Dense attention over a sequence the "dga" strategy splits runs "blockwise" only
    (`dense_attention`): another attention_impl would fail inside tracing."""
    impl, strategy = config.model.attention_impl, config.mesh.context_parallel
    if config.model.attention != "dense" or impl in SPLIT_IMPLEMENTATIONS:
        return
    how = f"config.mesh.context_parallel={strategy!r}"
    how += "" if strategy == "dga" else " (which resolved to 'dga')"
    fix = "config.model.overrides.attention_impl='blockwise' (or None)"
    fix += ", or config.mesh.context_parallel='ulysses'" if ulysses_fits else ""
    raise ConfigError(
        f"config.model.overrides.attention_impl={impl!r}: dense attention over a sequence split "
        f"by {how} runs 'blockwise' only; set {fix}"
    )


def _check_whole_sequences(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """A `ConfigError` if `config.model.attention` has no context parallelism and the mesh
    splits the sequence (the model would raise deep inside tracing)."""
    axes, parts = _mesh_parts(mesh, "seq")
    if config.model.attention in BASELINE_KINDS and parts > 1:
        how = ", ".join(f"config.mesh.{axis}={mesh.shape[axis]}" for axis in axes)
        raise ConfigError(
            f"config.model.overrides.attention={config.model.attention!r} has no context "
            f"parallelism: it needs whole sequences, but {how} splits them; set the mesh's seq "
            "to 1 (or attention 'dense' / 'dga')"
        )


def _mesh_parts(mesh: jax.sharding.Mesh, logical: str) -> tuple[tuple[str, ...], int]:
    """The mesh axes `DEFAULT_RULES` put `logical` on, and into how many parts they split it."""
    axes = axis_names(DEFAULT_RULES.spec((logical,))[0])
    return axes, math.prod(mesh.shape[axis] for axis in axes)


# Model config fields that size a weight dimension, and that dimension's logical axis.
_WEIGHT_AXES = (
    ("vocab_size", "vocab"),
    ("d_model", "embed"),
    ("num_heads", "heads"),
    ("num_kv_heads", "kv_heads"),
    ("intermediate_size", "mlp"),
)


def new_model(config: TrainConfig) -> Llama:
    """A freshly initialised model of `config` (under the current mesh)."""
    return Llama(config.model, DEFAULT_RULES, rngs=nnx.Rngs(config.train.seed))


def _same_sharding(_, sharding):
    return sharding


def _constant(value, _):
    return value


def _with_sharding(abstract: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)
