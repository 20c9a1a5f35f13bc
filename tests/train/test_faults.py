"""The faults a long run must survive, each against one uninterrupted run of the same command.

Every run here is `python -m train` on the embedded default, shortened (12 steps of 8 x 128
tokens, a checkpoint every 2 steps, an evaluation every 4); a faulted run, rerun, must log the
losses (and validation losses) of the uninterrupted one, bit for bit on the same devices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny_dga
from dga_jax.data.corpus import build_sample_corpus, default_corpus_dir
from dga_jax.errors import ConfigError, InputError
from tests.data.conftest import train_hf_tokenizer
from train.config import from_config_dict
from train.loop import run

ROOT = Path(__file__).parents[2]
STEPS = 12
OVERRIDES = {
    "data.seq_len": 128,
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.eval_every": 4,
    "train.eval_batches": 6,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 6,
}


def command(workdir: Path, **changes) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in {**OVERRIDES, **changes}.items()]
    return [
        sys.executable,
        "-m",
        "train",
        "--config=configs/tiny_dga.py",
        f"--workdir={workdir}",
        *flags,
    ]


def config(**changes):
    """The ConfigDict `command` describes, for runs in this process."""
    values = tiny_dga.get_config()
    for key, value in {**OVERRIDES, **changes}.items():
        section, name = key.split(".")
        values[section][name] = value
    return values


def env(devices: int = 1) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


def train(workdir: Path, *, devices: int = 1, **changes) -> subprocess.CompletedProcess:
    """Runs the command to its end; returns the finished process (stderr holds the log)."""
    result = subprocess.run(
        command(workdir, **changes),
        cwd=ROOT,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(workdir: Path, key: str) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def data_states(workdir: Path) -> dict[int, dict]:
    """The data iterator state of every checkpoint: equal states mean equal token streams."""
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    args = ocp.args.Composite(data=ocp.args.JsonRestore())
    states = {step: manager.restore(step, args=args).data for step in manager.all_steps()}
    manager.close()
    return states


def assert_same_run(workdir: Path, expected: Path) -> None:
    """The same losses, and the same data position at every step both runs checkpointed."""
    got, want = data_states(workdir), data_states(expected)
    shared = sorted(got.keys() & want.keys())
    assert STEPS in shared, (sorted(got), sorted(want))
    assert [got[s] for s in shared] == [want[s] for s in shared]
    for key in ("loss", "val_loss"):
        got, want = metrics(workdir, key), metrics(expected, key)
        assert sorted(got) == sorted(want), (key, sorted(got), sorted(want))
        np.testing.assert_array_equal(
            [got[s] for s in sorted(got)], [want[s] for s in sorted(want)]
        )


def copy_run(source: Path, target: Path, last_step: int) -> Path:
    """A workdir holding `source`'s checkpoints up to `last_step`: the run as it was then."""
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    for step_dir in (target / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > last_step:
            shutil.rmtree(step_dir)
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")
    return target


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run on one device."""
    workdir = tmp_path_factory.mktemp("whole")
    train(workdir)
    assert sorted(metrics(workdir, "loss")) == list(range(1, STEPS + 1))
    assert sorted(metrics(workdir, "val_loss")) == [4, 8, 12]
    return workdir


def start(workdir: Path, **changes) -> subprocess.Popen:
    return subprocess.Popen(
        command(workdir, **changes),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def partial_saves(workdir: Path) -> list[str]:
    directory = workdir / "checkpoints"
    return [p.name for p in directory.glob("*.orbax-checkpoint-tmp*")] if directory.exists() else []


def complete_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_partial_save(workdir: Path, process: subprocess.Popen, timeout=300) -> bool:
    """Polls until a save is being written after a complete one; False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if partial_saves(workdir) and complete_steps(workdir):
            return True
        time.sleep(0.002)
    return False


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_one(whole, tmp_path):
    # Kill the moment a save is on disk half-written; the kill may land just after Orbax
    # renamed it, so retry (each rerun resumes) until a kill leaves a partial save behind.
    for _ in range(5):
        process = start(tmp_path)
        writing = wait_for_partial_save(tmp_path, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert writing, "the run ended before any save was caught"
        partial = partial_saves(tmp_path)
        if partial:
            break
    assert partial, "no kill landed inside a save"
    complete = complete_steps(tmp_path)
    partial_step = int(partial[0].split(".")[0])
    assert partial_step not in complete
    rerun = train(tmp_path)
    assert f"resuming from step {complete[-1]} " in rerun.stderr
    assert not partial_saves(tmp_path)  # cleaned up on restart
    assert_same_run(tmp_path, whole)


def test_sigterm_during_a_save_saves_and_exits_cleanly(whole, tmp_path):
    process = start(tmp_path)
    assert wait_for_partial_save(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped early" in out
    last = max(metrics(tmp_path, "loss"))
    assert last < STEPS and complete_steps(tmp_path)[-1] == last
    train(tmp_path)
    assert_same_run(tmp_path, whole)


def test_sigterm_during_an_evaluation_saves_and_the_rerun_owes_it(whole, tmp_path):
    process = start(tmp_path)
    for line in process.stderr:
        if "evaluating step 4" in line:
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped early" in out and "evaluation of step 4 abandoned" in err
    assert complete_steps(tmp_path)[-1] == 4
    assert 4 not in metrics(tmp_path, "val_loss")
    train(tmp_path)  # evaluates step 4 first, then goes on
    assert_same_run(tmp_path, whole)


def truncate_the_arrays(step_dir: Path) -> None:
    state_files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    biggest = max(state_files, key=lambda p: p.stat().st_size)  # the parameters' data file
    os.truncate(biggest, biggest.stat().st_size // 2)


def delete_the_data_position(step_dir: Path) -> None:
    (step_dir / "data" / "metadata").unlink()


def damage_the_run_record(step_dir: Path) -> None:
    (step_dir / "run" / "metadata").write_text('{"config": ')


@pytest.mark.parametrize(
    "damage", [truncate_the_arrays, delete_the_data_position, damage_the_run_record]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(whole, tmp_path, damage):
    copy_run(whole, tmp_path, last_step=6)
    damage(tmp_path / "checkpoints" / "6")
    rerun = train(tmp_path)
    assert re.search(r"checkpoint \S*checkpoints/6 is damaged", rerun.stderr), rerun.stderr[-3000:]
    assert "resuming from step 4" in rerun.stderr
    assert (tmp_path / "damaged_checkpoints/6/state").is_dir()  # kept, out of the way
    assert_same_run(tmp_path, whole)


def test_a_deleted_file_in_every_checkpoint_stops_with_a_clear_error(whole, tmp_path):
    copy_run(whole, tmp_path, last_step=4)
    for step in (2, 4):
        delete_the_data_position(tmp_path / "checkpoints" / str(step))
    result = subprocess.run(
        command(tmp_path), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in") and "step 4" in last and "step 2" in last
    assert complete_steps(tmp_path) == [2, 4]  # nothing moved: the user decides


@pytest.mark.parametrize("keep", [6, 1])
def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(whole, tmp_path, keep):
    copy_run(whole, tmp_path, last_step=4)
    # Files stop growing at 256 KiB (bash's ulimit -f counts KiB): metrics and logs fit, the
    # next checkpoint's arrays do not. With keep=1 the failed save has already let go of the
    # older steps in Orbax's view, not on disk: the error must still name step 4.
    limited = [
        "bash",
        "-c",
        'ulimit -f 256 && exec "$@"',
        "bash",
        *command(tmp_path, **{"train.keep_checkpoints": keep}),
    ]
    result = subprocess.run(
        limited, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    # One error line (Orbax's writer thread logs its own traceback too, possibly after it).
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: could not save the checkpoint of step 6"), errors
    assert "File too large" in errors[0] and "step 4" in errors[0]
    assert complete_steps(tmp_path) == [2, 4] and not partial_saves(tmp_path)
    train(tmp_path)  # with room again: resumes from step 4
    assert_same_run(tmp_path, whole)


@pytest.fixture(scope="module")
def saved(whole, tmp_path_factory):
    """A run stopped at step 6, to resume with another config."""
    return copy_run(whole, tmp_path_factory.mktemp("stopped"), last_step=6)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    return train_hf_tokenizer(path, ["<unk>", "<s>", "</s>"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.seq_len", 64),
        ("train.global_batch_size", 4),
        ("data.seed", 1),
        ("data.tokenizer", "OTHER"),
    ],
)
def test_resuming_with_another_data_order_is_refused(saved, other_tokenizer, key, value):
    value = str(other_tokenizer) if value == "OTHER" else value
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}: "):
        run(from_config_dict(config(**{key: value})), saved)
    assert complete_steps(saved)[-1] == 6 and max(metrics(saved, "loss")) == STEPS


def test_resuming_with_another_model_shape_is_refused(saved):
    changed = config()
    changed.model.overrides.num_layers = 3
    with pytest.raises(ConfigError, match=r"config\.model\.num_layers: 2 -> 3"):
        run(from_config_dict(changed), saved)


def test_resuming_with_harmless_changes_is_accepted_and_logged(saved, tmp_path, caplog):
    workdir = copy_run(saved, tmp_path, last_step=6)
    changes = {"train.steps": 8, "optim.learning_rate": 2e-3, "train.eval_every": 3}
    caplog.set_level("WARNING")
    summary = run(from_config_dict(config(**changes)), workdir)
    assert summary.step == 8
    logged = caplog.text
    for line in (
        "config.train.steps: 12 -> 8",
        "config.optim.learning_rate: 0.001 -> 0.002",
        "config.train.eval_every: 4 -> 3",
    ):
        assert line in logged


def test_a_data_set_moved_whole_resumes_where_it_was(whole, saved, tmp_path):
    # The data path was a fixed key: a copy of the same shards on another disk was refused. The
    # saved position's shard fingerprint decides: the same files resume, others are refused.
    corpus = tmp_path / "moved"
    shutil.copytree(build_sample_corpus(default_corpus_dir()), corpus)
    paths = {"data.train": f"{corpus}/train", "data.validation": f"{corpus}/validation"}
    workdir = copy_run(saved, tmp_path / "run", last_step=6)
    result = train(workdir, **paths)
    assert f"config.data.train: '' -> '{corpus}/train'" in result.stderr
    assert_same_run(workdir, whole)
    sorted(p for p in (corpus / "train").rglob("*") if p.is_file())[-1].unlink()
    with pytest.raises(InputError, match=r"config.data.train: the shard files changed"):
        run(from_config_dict(config(**paths)), copy_run(saved, tmp_path / "fewer", last_step=6))


def assert_close_run(workdir: Path, expected: Path, rtol: float) -> None:
    """The same data position at every shared checkpoint, losses equal within `rtol`."""
    got, want = data_states(workdir), data_states(expected)
    shared = sorted(got.keys() & want.keys())
    assert STEPS in shared and [got[s] for s in shared] == [want[s] for s in shared]
    for key in ("loss", "val_loss"):
        got_values, want_values = metrics(workdir, key), metrics(expected, key)
        assert sorted(got_values) == sorted(want_values)
        steps = sorted(want_values)
        np.testing.assert_allclose(
            [got_values[s] for s in steps], [want_values[s] for s in steps], rtol=rtol
        )


# Meshes of the (data, fsdp, seq, tensor) axes, and the device counts they take.
MESHES = {
    8: {"mesh.data": 1, "mesh.fsdp": 8},
    4: {"mesh.data": 2, "mesh.fsdp": 2},
}
# Float tolerance between runs on different meshes: their reductions add in other orders
# (measured: 8 devices vs 1 differ by < 1e-6 relative over 12 steps).
MESH_RTOL = 1e-5


@pytest.fixture(scope="module")
def whole_on(tmp_path_factory):
    """Uninterrupted runs on the `MESHES`, made on first use."""
    runs = {}

    def get(devices: int) -> Path:
        if devices not in runs:
            runs[devices] = tmp_path_factory.mktemp(f"whole{devices}")
            train(runs[devices], devices=devices, **MESHES[devices])
        return runs[devices]

    return get


def test_resume_on_more_devices(whole, whole_on, tmp_path):
    copy_run(whole, tmp_path, last_step=6)  # saved on 1 device
    rerun = train(tmp_path, devices=8, **MESHES[8])
    assert "resuming from step 6" in rerun.stderr
    assert_close_run(tmp_path, whole_on(8), MESH_RTOL)
    assert_close_run(tmp_path, whole, MESH_RTOL)


def test_resume_on_fewer_devices_and_another_mesh_shape(whole, whole_on, tmp_path):
    copy_run(whole_on(8), tmp_path, last_step=6)
    rerun = train(tmp_path, devices=4, **MESHES[4])
    assert "resuming from step 6" in rerun.stderr
    # Runs on every mesh agree to MESH_RTOL: one device's uninterrupted run is the reference.
    assert_close_run(tmp_path, whole, MESH_RTOL)
