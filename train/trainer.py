"""The per-step work around the jitted step: logging, evaluation, checkpoints, the non-finite
guard, and the run's summary."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax

from dga_jax.data import pipeline
from train import metrics
from train.batches import global_batch
from train.config import TrainConfig
from train.hosts import StopSignal, all_rows_state, process_sum
from train.profiler import StepProfiler
from train.resume import flat_record
from train.setup import Setup, step_fn
from train.step import TrainState, eval_step, learning_rate_schedule


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


class Trainer:
    """The per-step work around the jitted step: logging, evaluation, checkpoints.

    `start` is the step the run resumes from (0: a fresh run); `eval_owed`, whether its
    checkpoint owes the evaluation of that step (the loop runs it first).
    """

    def __init__(
        self,
        config,
        setup: Setup,
        train_iter,
        checkpoints,
        data_config,
        workdir,
        *,
        start: int,
        eval_owed: bool = False,
    ):
        self.config, self.setup, self.train_iter = config, setup, train_iter
        self.config_record = flat_record(config)  # what each checkpoint stores of the config
        self.checkpoints, self.data_config, self.start = checkpoints, data_config, start
        self.step_fn = step_fn(setup)
        self.eval_fn = jax.jit(
            functools.partial(eval_step, setup.graphdef, loss_chunks=setup.loss_chunks)
        )
        self.schedule = learning_rate_schedule(config.optim, config.train.steps)
        self.peak = metrics.peak_flops(
            jax.devices()[0].device_kind, config.train.peak_flops_per_device
        )
        # What `close` releases, made last: the metrics file is what may refuse (InputError),
        # and the signal handlers must not outlive a constructor that raised.
        main_host = jax.process_index() == 0
        self.log = metrics.MetricsLog(
            workdir,
            resume_step=start,
            eval_owed=eval_owed,
            enabled=main_host,
            wandb_project=config.train.wandb_project,
            run_config=dataclasses.asdict(config),
        )
        self.progress = metrics.Progress(config.train.steps, start, enabled=main_host)
        self.profiler = StepProfiler(config.train.profile_range, Path(workdir), start=start)
        self.stop, self.stopping, self.eval_owed = StopSignal(), False, False
        self.began = self.window_start = time.time()
        self.window_losses: list[jax.Array] = []
        # The last values logged, from metrics.jsonl on a resumed run until this one logs.
        self.last = {"loss": math.nan, "val_loss": None, "tokens_per_s": 0.0, **self.log.last}

    def step(self, state: TrainState, done: int) -> TrainState:
        """Runs step `done` (1-based); logs, evaluates and checkpoints when due."""
        with self.profiler.annotate(done):
            batch = self._batch(next(self.train_iter))
            state, out = self.step_fn(state, batch)
        self.profiler.finished(done, out)
        self.window_losses.append(out["loss"])
        run_cfg = self.config.train
        diverged = _diverged(state, self.config)
        # A divergence's steps are logged before it stops the run: metrics.jsonl shows them.
        if diverged or done % run_cfg.log_every == 0 or done == run_cfg.steps:
            self._log_train(done, state, out)
        _check_finite(state, self.config, done)
        if done % run_cfg.eval_every == 0 or done == run_cfg.steps:
            self.eval_owed = not self._evaluate_due(done, state)
        self.stopping = self.stop.agreed()
        if self.stopping and self.window_losses:  # the steps since the last log: logged now
            self._log_train(done, state, out)
        self.save(state, force=self.stopping)
        self.eval_owed = False
        return state

    def _evaluate_due(self, done: int, state: TrainState) -> bool:
        """`evaluate`; if it raises, the checkpoint due at step `done` is saved first, owing the
        evaluation (else the steps since the last one are lost). With several processes the others
        may be inside the evaluation's collectives: the error alone ends them all."""
        try:
            return self.evaluate(done, state)
        except Exception:
            if jax.process_count() == 1:
                self.eval_owed = True
                self.save(state, force=False)
            raise

    def save(self, state: TrainState, *, force: bool) -> None:
        """A checkpoint when due (or forced); every process takes part, in the data state's
        gather too (only for a save)."""

        def data_state():
            return all_rows_state(self.train_iter.get_state())

        record = {"config": self.config_record, "eval_owed": self.eval_owed}
        self.checkpoints.save(int(state.step), state, data_state, record, force=force)

    def _batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        setup = self.setup
        return global_batch(
            local, setup.rows, setup.batch_sharding, setup.batch_shape, setup.row_order
        )

    def _log_train(self, done: int, state: TrainState, out: dict[str, jax.Array]) -> None:
        steps, seconds = len(self.window_losses), time.time() - self.window_start
        loss = _finite_mean([float(x) for x in self.window_losses])
        tokens = steps * self.config.train.global_batch_size * self.config.data.seq_len
        tokens_per_s = tokens / seconds
        record = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "learning_rate": applied_learning_rate(self.schedule, done, state),
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

    def report_finished(self) -> None:
        """Says that the run had already reached `config.train.steps`: no step is run."""
        losses = {key: self.log.last[key] for key in ("loss", "val_loss") if key in self.log.last}
        logging.warning(
            "the run in %s already finished at step %d (config.train.steps=%d; last logged: %s): "
            "no step to run; raise config.train.steps to train further",
            self.log.path.parent,
            self.start,
            self.config.train.steps,
            ", ".join(f"{key} {value:.4f}" for key, value in losses.items()) or "nothing",
        )

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
        """Releases everything, the pending checkpoint save last. Each release runs even if one
        before it fails; the failures are logged and the last raises (a failed save's, if any)."""
        releases = (
            self.profiler.close,
            self.progress.close,
            self.train_iter.close,
            self.log.close,
            self.stop.restore,
            self.checkpoints.close,
        )
        failed = None
        for release in releases:
            try:
                release()
            except Exception as error:  # any release's; the later ones must still run
                logging.error("closing the run: %s: %s", type(error).__name__, error)
                failed = error
        if failed is not None:
            raise failed


def applied_learning_rate(schedule: optax.Schedule, done: int, state: TrainState) -> float:
    """The learning rate of the last update applied by step `done`: the optimizer's schedule
    counts applied updates, and a non-finite step is skipped whole (optimizer state included)."""
    applied = done - int(state.nonfinite_total)
    return float(schedule(max(applied - 1, 0)))


def _check_finite(state: TrainState, config: TrainConfig, step: int) -> None:
    streak = int(state.nonfinite_streak)
    if streak:
        logging.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, streak
        )
    if _diverged(state, config):
        raise NonFiniteError(
            f"{streak} non-finite steps in a row (config.optim.max_nonfinite_steps="
            f"{config.optim.max_nonfinite_steps}) at step {step}: lower the learning rate or "
            "check the data; the last checkpoint holds the state before the divergence"
        )


def _diverged(state: TrainState, config: TrainConfig) -> bool:
    """Whether the non-finite steps in a row reached config.optim.max_nonfinite_steps."""
    return int(state.nonfinite_streak) >= config.optim.max_nonfinite_steps


def _finite_mean(losses: list[float]) -> float:
    """The mean of the finite `losses` (NaN if none is): a skipped step's NaN would hide the
    losses of the window's other steps (their count is `nonfinite_steps`)."""
    finite = [x for x in losses if math.isfinite(x)]
    return float(np.mean(finite)) if finite else math.nan


def _skipped_records(train_iter) -> dict[str, int]:
    """The records every process's rows skipped so far: a gather, which every process calls at
    the same steps (`_log_train`'s, which depend on nothing local)."""
    stats = getattr(train_iter, "stats", None)
    return {} if stats is None else {"skipped_records": process_sum(int(stats.skipped))}


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
