"""The training job: its starting state (resumed, HF-initialised or fresh), the steps, the export.

`run(config, workdir)` is the whole job. It checks every input first (`train.inputs`), resumes
from the newest checkpoint in the workdir that restores (same command, same losses; on any mesh;
a config that would change the data order or the model's shapes is refused), saves on
SIGTERM/SIGINT (an evaluation under way is abandoned, and owed by the resumed run), and stops
with a clear message after `optim.max_nonfinite_steps` non-finite steps in a row. The mesh,
shardings and jitted step are `train.setup`'s; the work around each step is `train.trainer`'s.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dga_jax.checkpoint import load_config
from dga_jax.checkpoint.orbax_io import save_params
from dga_jax.data import pipeline
from dga_jax.errors import ConfigError, InputError
from dga_jax.model.config import ModelConfig, with_token_ids_of
from dga_jax.model.hf_config import config_to_hf
from train import metrics
from train.checkpointing import Checkpoints
from train.config import TrainConfig
from train.hosts import rows_state
from train.inputs import NUMERIC_FIELDS, check_inputs, check_num_workers, pipeline_config
from train.resume import resume_changes
from train.setup import Setup, make_setup, new_model
from train.setup import lower_train_step as lower_train_step  # public API: kept importable here
from train.step import TrainState
from train.trainer import Summary, Trainer


def run(config: TrainConfig, workdir: str | Path) -> Summary:
    """Trains `config` in `workdir` (created; resumed if it holds a checkpoint)."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"the workdir {workdir} is a file: name a directory (made if missing)")
    check_inputs(config)
    setup = make_setup(config)
    check_num_workers(config, len(setup.rows))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on its path, no permission
        raise InputError(f"cannot make the workdir {workdir}: {error}") from error
    data_config = pipeline_config(config)
    checkpoints = Checkpoints(
        workdir / "checkpoints",
        every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    with _closed_on_error(checkpoints):
        train_iter = pipeline.make_train_iterator(data_config, rows=setup.rows)
    with jax.set_mesh(setup.mesh):
        with _closed_on_error(train_iter, checkpoints):  # until the Trainer owns them
            state, eval_owed = _initial_state(config, setup, checkpoints, train_iter)
            trainer = Trainer(
                config,
                setup,
                train_iter,
                checkpoints,
                data_config,
                workdir,
                start=int(state.step),
                eval_owed=eval_owed,
            )
        return _train(config, trainer, state, workdir, eval_owed)


@contextlib.contextmanager
def _closed_on_error(*resources):
    """Closes `resources` if the block raises: a refused resume or a bad metrics file left Grain's
    workers and Orbax's manager (its threads) running in a process that goes on (a notebook)."""
    try:
        yield
    except BaseException:
        for resource in resources:
            try:
                resource.close()
            except Exception as error:  # the block's error is the one to raise
                logging.error("closing after a failed start: %s: %s", type(error).__name__, error)
        raise


def _initial_state(
    config, setup: Setup, checkpoints: Checkpoints, train_iter
) -> tuple[TrainState, bool]:
    """The newest usable checkpoint's state (and data position), else a fresh or
    HF-initialised one; and whether the evaluation of the starting step is still owed."""
    if checkpoints.steps():
        _check_resumed_config(config, checkpoints)
        restored = checkpoints.restore_newest(setup.abstract_state)
        if restored is not None:
            step, state, data_state, record = restored
            logging.info("resuming from step %d in %s", step, checkpoints.directory)
            train_iter.set_state(rows_state(data_state, setup.rows))
            return state, bool((record or {}).get("eval_owed", False))
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


def _initial_params(config: TrainConfig, setup: Setup) -> nnx.State:
    if config.init_checkpoint:
        from dga_jax.checkpoint import load_model

        logging.info("initialising from %s", config.init_checkpoint)
        model = load_model(config.init_checkpoint, mesh=setup.mesh, **_model_changes(config))
        return nnx.state(model)

    def init():
        return nnx.state(new_model(config))

    return jax.jit(init, out_shardings=setup.shardings.params)()


def _model_changes(config: TrainConfig) -> dict[str, Any]:
    """What the experiment changes in a checkpoint's model: attention, dtypes, remat, and every
    field that shapes no weight (`NUMERIC_FIELDS`: RoPE, the window), which the run takes from
    config.model whatever the checkpoint's (`check_inputs` says where they differ)."""
    keep = (
        "attention",
        "dga",
        "attention_impl",
        "context_parallel",
        "context_order",
        "dtype",
        "param_dtype",
        "remat",
        "scan_layers",
        *NUMERIC_FIELDS,
    )
    return {key: getattr(config.model, key) for key in keep}


def _exported_config(config: TrainConfig) -> ModelConfig:
    """config.model, with the special token ids of `init_checkpoint` where it sets none (the
    presets set none): a LLaMA2-7B run exported to HF keeps its bos and eos; and its HF layout
    (`hf_model_type`), `_with_layout_of`."""
    if not config.init_checkpoint:
        return config.model
    source = load_config(config.init_checkpoint)
    return _with_layout_of(with_token_ids_of(config.model, source), source)


def _with_layout_of(model: ModelConfig, source: ModelConfig) -> ModelConfig:
    """`model` with `source`'s `hf_model_type` where it sets none and can be exported in it (a
    run from a converted Phi-3 converts back to Phi-3's fused tensors); where it cannot (a RoPE
    kind Phi-3 has not), as it is, said in the log: `orbax-to-hf` then writes the architecture
    its fields name (LLaMA or Mistral tensors), or names what none can hold."""
    if model.hf_model_type is not None or source.hf_model_type is None:
        return model
    layout = model.replace(hf_model_type=source.hf_model_type)
    try:
        config_to_hf(layout)
    except ConfigError as error:
        logging.warning("the exported model keeps no %s layout: %s", source.hf_model_type, error)
        return model
    return layout


def _train(
    config: TrainConfig, trainer: Trainer, state: TrainState, workdir: Path, eval_owed: bool
) -> Summary:
    try:
        # A stop signal cut the restored step's evaluation short: it comes first. Cut short
        # again, the checkpoint (already saved) still owes it.
        if eval_owed and not trainer.evaluate(trainer.start, state):
            trainer.stopping = True
        done = trainer.start
        if done >= config.train.steps:
            trainer.report_finished()
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
        save_params(path, _exported_config(config), nnx.to_pure_dict(state.params))
        logging.info("model exported to %s", path)
    return path
