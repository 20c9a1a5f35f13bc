"""The training loop: mesh, sharded state, data, the jitted step, evaluation, checkpoints.

`run(config, workdir)` is the whole job. It checks every input first (`train.inputs`), resumes
from the newest checkpoint in the workdir that restores (same command, same losses; on any mesh;
a config that would change the data order or the model's shapes is refused), saves on
SIGTERM/SIGINT (an evaluation under way is abandoned, and owed by the resumed run), and stops
with a clear message after `optim.max_nonfinite_steps` non-finite steps in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dga_jax import DEFAULT_RULES, Llama, make_mesh
from dga_jax.checkpoint.orbax_io import save_params
from dga_jax.data import pipeline
from train import metrics
from train.batches import addressed_rows, global_batch
from train.checkpointing import Checkpoints
from train.config import TrainConfig, flat_record, resume_changes
from train.hosts import StopSignal, all_rows_state, rows_state
from train.inputs import check_inputs
from train.profiler import StepProfiler
from train.step import (
    TrainState,
    eval_step,
    learning_rate_schedule,
    make_optimizer,
    train_step,
    weight_decay_mask,
)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclasses.dataclass
class Summary:
    """The end of a run, as printed in its last line."""

    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    seconds: float
    stopped_early: bool = False


@dataclasses.dataclass
class _Setup:
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: TrainState
    shardings: TrainState
    batch_sharding: NamedSharding  # of [accum, B / accum, T] batches
    batch_shape: tuple[int, int, int]
    rows: list[int]  # global batch rows this process's devices hold
    row_order: np.ndarray  # [T] position of each column of a batch (`Llama.row_positions`)


def run(config: TrainConfig, workdir: str | Path) -> Summary:
    """Trains `config` in `workdir` (created; resumed if it holds a checkpoint)."""
    workdir = Path(workdir)
    check_inputs(config)
    workdir.mkdir(parents=True, exist_ok=True)
    setup = _setup(config)
    checkpoints = Checkpoints(
        workdir / "checkpoints",
        every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    data_config = _data_config(config)
    train_iter = pipeline.make_train_iterator(data_config, rows=setup.rows)
    with jax.set_mesh(setup.mesh):
        state, eval_owed = _initial_state(config, setup, checkpoints, train_iter)
        return _train(
            config, setup, state, train_iter, checkpoints, data_config, workdir, eval_owed
        )


def lower_train_step(config: TrainConfig, devices: Sequence[jax.Device]) -> jax.stages.Lowered:
    """`config`'s train step on a mesh of `devices`, lowered from abstract state and batch.

    No weights or data are touched: compile the result for a topology's compile-only devices
    (`dga_jax.aot`) to see whether a recipe fits a TPU or GPU slice, and its memory per device.
    """
    setup = _setup(config, devices)
    batch = {
        key: jax.ShapeDtypeStruct(setup.batch_shape, jnp.int32, sharding=setup.batch_sharding)
        for key in ("inputs", "targets")
    }
    with jax.set_mesh(setup.mesh):
        return _step_fn(setup).trace(setup.abstract_state, batch).lower()


def _step_fn(setup: _Setup):
    """The jitted train step: the state is donated and keeps its shardings."""
    return jax.jit(
        functools.partial(train_step, setup.graphdef, setup.tx),
        donate_argnums=0,
        out_shardings=(setup.shardings, None),
    )


def _setup(config: TrainConfig, devices: Sequence[jax.Device] | None = None) -> _Setup:
    devices = jax.devices() if devices is None else devices
    mesh = make_mesh(config.mesh.shape(len(devices)), devices=devices)
    with jax.set_mesh(mesh):
        abstract_model = nnx.eval_shape(functools.partial(_new_model, config))
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
    return _Setup(
        mesh,
        graphdef,
        tx,
        abstract_state,
        shardings,
        batch_sharding,
        batch_shape,
        addressed_rows(batch_sharding, batch_shape),
        row_order,
    )


def _new_model(config: TrainConfig) -> Llama:
    return Llama(config.model, DEFAULT_RULES, rngs=nnx.Rngs(config.train.seed))


def _same_sharding(_, sharding):
    return sharding


def _constant(value, _):
    return value


def _with_sharding(abstract: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)


def _initial_state(
    config, setup: _Setup, checkpoints: Checkpoints, train_iter
) -> tuple[TrainState, bool]:
    """The newest usable checkpoint's state (and data position), else a fresh or
    HF-initialised one; and whether the evaluation of the starting step is still owed."""
    if checkpoints.steps():
        _check_resumed_config(config, checkpoints)
        restored = checkpoints.restore_newest(setup.abstract_state)
        if restored is not None:
            step, state, data_state = restored
            logging.info("resuming from step %d in %s", step, checkpoints.directory)
            train_iter.set_state(rows_state(data_state, setup.rows))
            record = checkpoints.run_record(step) or {}
            return state, bool(record.get("eval_owed", False))
    params = _initial_params(config, setup)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings.opt_state)(params)
    counters = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers: all donated
    return TrainState(counters[0], params, opt_state, counters[1], counters[2]), False


def _check_resumed_config(config: TrainConfig, checkpoints: Checkpoints) -> None:
    """Refuses a config that changes the data order or the model (before restoring anything);
    logs the changes it accepts. Reads the newest run record that reads."""
    for step in reversed(checkpoints.steps()):
        try:
            record = checkpoints.run_record(step)
        except Exception:  # a damaged record: restore_newest reports and skips its checkpoint
            continue
        if record is None:
            logging.warning("checkpoint %d records no config: changes are not checked", step)
            return
        source = f"the checkpoint of step {step} in {checkpoints.directory}"
        for change in resume_changes(record["config"], config, source):
            logging.warning("resuming with a changed config: %s", change)
        return


def _initial_params(config: TrainConfig, setup: _Setup) -> nnx.State:
    if config.init_checkpoint:
        from dga_jax.checkpoint import load_model

        logging.info("initialising from %s", config.init_checkpoint)
        model = load_model(config.init_checkpoint, mesh=setup.mesh, **_model_changes(config))
        return nnx.state(model)

    def init():
        return nnx.state(_new_model(config))

    return jax.jit(init, out_shardings=setup.shardings.params)()


def _model_changes(config: TrainConfig) -> dict[str, Any]:
    """What the experiment changes in a checkpoint's model: attention, dtypes, remat, ..."""
    keep = (
        "attention",
        "dga",
        "attention_impl",
        "context_parallel",
        "context_order",
        "dtype",
        "param_dtype",
        "remat",
        "rope_scaling",
        "max_position",
    )
    return {key: getattr(config.model, key) for key in keep}


def _data_config(config: TrainConfig) -> pipeline.DataConfig:
    """The pipeline's config; no `data.train` means the sample corpus (built on first use)."""
    data = config.data
    return pipeline.DataConfig(
        seq_len=data.seq_len,
        global_batch_size=config.train.global_batch_size,
        tokenizer=data.tokenizer,
        train=data.train or None,
        validation=data.validation or None,
        set_names=data.set_names,
        seed=data.seed,
        num_workers=data.num_workers,
        eval_batches=config.train.eval_batches,
    )


def _train(
    config,
    setup: _Setup,
    state: TrainState,
    train_iter,
    checkpoints: Checkpoints,
    data_config,
    workdir: Path,
    eval_owed: bool,
) -> Summary:
    trainer = _Trainer(
        config, setup, train_iter, checkpoints, data_config, workdir, start=int(state.step)
    )
    try:
        # A stop signal cut the restored step's evaluation short: it comes first. Cut short
        # again, the checkpoint (already saved) still owes it.
        if eval_owed and not trainer.evaluate(trainer.start, state):
            trainer.stopping = True
        done = trainer.start
        while done < config.train.steps and not trainer.stopping:
            done += 1
            state = trainer.step(state, done)
        if trainer.stopping:
            logging.warning("stopping at step %d on a signal (checkpoint saved)", done)
        trainer.save(state, force=True)
    finally:
        trainer.close()
    if not trainer.stopping:
        export_model(config, state, workdir)
    if jax.process_index() == 0:
        metrics.plot_losses(trainer.log.path, workdir / "loss.png")
    return trainer.summary(state)


def export_model(config: TrainConfig, state: TrainState, workdir: Path) -> Path:
    """Writes the trained parameters and model config to `workdir/model/<step>`, the directory
    `dga_jax.checkpoint.load_model` and `python -m dga_jax.generate --checkpoint` read."""
    path = workdir / "model" / str(int(state.step))
    if not path.exists():  # a finished run that is started again has nothing new to export
        save_params(path, config.model, nnx.to_pure_dict(state.params))
        logging.info("model exported to %s", path)
    return path


class _Trainer:
    """The per-step work around the jitted step: logging, evaluation, checkpoints."""

    def __init__(
        self, config, setup: _Setup, train_iter, checkpoints, data_config, workdir, *, start: int
    ):
        self.config, self.setup, self.train_iter = config, setup, train_iter
        self.checkpoints, self.data_config, self.start = checkpoints, data_config, start
        self.step_fn = _step_fn(setup)
        main_host = jax.process_index() == 0
        self.log = metrics.MetricsLog(
            workdir,
            resume_step=start,
            enabled=main_host,
            wandb_project=config.train.wandb_project,
            run_config=dataclasses.asdict(config),
        )
        self.progress = metrics.Progress(config.train.steps, start, enabled=main_host)
        self.stop, self.stopping, self.eval_owed = StopSignal(), False, False
        self.profiler = StepProfiler(config.train.profile_range, Path(workdir))
        self.eval_fn = jax.jit(functools.partial(eval_step, setup.graphdef))
        self.schedule = learning_rate_schedule(config.optim, config.train.steps)
        self.peak = metrics.peak_flops(
            jax.devices()[0].device_kind, config.train.peak_flops_per_device
        )
        self.began = self.window_start = time.time()
        self.window_losses: list[jax.Array] = []
        self.last = {"loss": math.nan, "val_loss": None, "tokens_per_s": 0.0}

    def step(self, state: TrainState, done: int) -> TrainState:
        """Runs step `done` (1-based); logs, evaluates and checkpoints when due."""
        with self.profiler.annotate(done):
            batch = self._batch(next(self.train_iter))
            state, out = self.step_fn(state, batch)
        self.profiler.finished(done, out)
        self.window_losses.append(out["loss"])
        run_cfg = self.config.train
        _check_finite(state, self.config, done)
        if done % run_cfg.log_every == 0 or done == run_cfg.steps:
            self._log_train(done, state, out)
        if done % run_cfg.eval_every == 0 or done == run_cfg.steps:
            self.eval_owed = not self.evaluate(done, state)
        self.stopping = self.stop.agreed()
        self.save(state, force=self.stopping)
        self.eval_owed = False
        return state

    def save(self, state: TrainState, *, force: bool) -> None:
        """A checkpoint when due (or forced); every process takes part."""
        data_state = all_rows_state(self.train_iter.get_state())
        record = {"config": flat_record(self.config), "eval_owed": self.eval_owed}
        self.checkpoints.save(int(state.step), state, data_state, record, force=force)

    def _batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        setup = self.setup
        return global_batch(
            local, setup.rows, setup.batch_sharding, setup.batch_shape, setup.row_order
        )

    def _log_train(self, done: int, state: TrainState, out: dict[str, jax.Array]) -> None:
        steps, seconds = len(self.window_losses), time.time() - self.window_start
        loss = float(np.mean([float(x) for x in self.window_losses]))
        tokens = steps * self.config.train.global_batch_size * self.config.data.seq_len
        tokens_per_s = tokens / seconds
        record = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "learning_rate": float(self.schedule(done - 1)),
            "grad_norm": float(out["grad_norm"]),
            "tokens_per_s": tokens_per_s,
            "step_time_s": seconds / steps,
            "nonfinite_steps": int(state.nonfinite_total),
            **_skipped_records(self.train_iter),
        }
        if self.peak:
            record["mfu"] = (
                tokens_per_s * _flops_per_token(self.config) / (self.peak * jax.device_count())
            )
        self.log.write(done, record)
        self.progress.update(steps, loss, tokens_per_s)
        self.last.update(loss=loss, tokens_per_s=tokens_per_s)
        self.window_start, self.window_losses = time.time(), []

    def evaluate(self, done: int, state: TrainState) -> bool:
        """Logs the validation loss after step `done`; False if a stop signal cut it short."""
        began = time.time()
        logging.info("evaluating step %d", done)
        eval_iter = pipeline.make_eval_iterator(self.data_config, rows=self.setup.rows)
        losses = []
        with contextlib.closing(eval_iter):
            for batch in eval_iter:
                if self.stop.agreed():
                    logging.warning("evaluation of step %d abandoned on a signal", done)
                    return False
                losses.append(float(self.eval_fn(state.params, self._batch(batch))))
        val_loss = float(np.mean(losses))
        self.log.write(
            done, {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
        )
        self.last["val_loss"] = val_loss
        self.window_start += time.time() - began  # evaluation is not training throughput
        return True

    def summary(self, state: TrainState) -> Summary:
        return Summary(
            int(state.step),
            self.last["loss"],
            self.last["val_loss"],
            self.last["tokens_per_s"],
            time.time() - self.began,
            stopped_early=self.stopping,
        )

    def close(self) -> None:
        """Releases everything; the pending checkpoint save last (its failure raises)."""
        self.profiler.close()
        self.progress.close()
        self.train_iter.close()
        self.log.close()
        self.stop.restore()
        self.checkpoints.close()


def _check_finite(state: TrainState, config: TrainConfig, step: int) -> None:
    streak = int(state.nonfinite_streak)
    if streak:
        logging.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, streak
        )
    if streak >= config.optim.max_nonfinite_steps:
        raise NonFiniteError(
            f"{streak} non-finite steps in a row (config.optim.max_nonfinite_steps="
            f"{config.optim.max_nonfinite_steps}) at step {step}: lower the learning rate or "
            "check the data; the last checkpoint holds the state before the divergence"
        )


def _skipped_records(train_iter) -> dict[str, int]:
    stats = getattr(train_iter, "stats", None)
    return {} if stats is None else {"skipped_records": int(stats.skipped)}


def _flops_per_token(config: TrainConfig) -> float:
    """6 N (weights) plus attention's 12 L d_attn T / 2 (causal), per trained token."""
    m = config.model
    weights = m.num_layers * (
        m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
        + 3 * m.d_model * m.intermediate_size
    )
    weights += m.vocab_size * m.d_model
    attention = 6 * m.num_layers * m.num_heads * m.head_dim * config.data.seq_len
    return 6 * weights + attention
