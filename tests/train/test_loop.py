"""The training loop end to end on the embedded default, shortened: learning, resume, stops."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny_dga
from dga_jax import Llama
from dga_jax.checkpoint import load_model
from dga_jax.data.tokenizers import ByteTokenizer
from train.config import from_config_dict
from train.loop import NonFiniteError, run

ROOT = Path(__file__).parents[2]


def tiny(**train) -> object:
    config = tiny_dga.get_config()
    config.data.seq_len = 128
    for key, value in {
        "steps": 12,
        "log_every": 1,
        "eval_every": 1000,
        "eval_batches": 2,
        "checkpoint_every": 1000,
        **train,
    }.items():
        config.train[key] = value
    return config


def read(workdir: Path, key: str) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_validation_loss_falls(tmp_path):
    config = tiny(steps=40, eval_every=20, log_every=10)
    summary = run(from_config_dict(config), tmp_path)
    val = read(tmp_path, "val_loss")
    assert sorted(val) == [20, 40]
    assert val[40] < val[20] - 0.3, val
    assert val[40] < np.log(259) - 1.5, val  # far below a uniform guess over the byte vocab
    assert summary.step == 40 and summary.val_loss == val[40]
    assert (tmp_path / "loss.png").stat().st_size > 0
    # The trained model is exported where load_model and `python -m dga_jax.generate` read it.
    train_config = from_config_dict(config)
    model = load_model(tmp_path / "model" / "40")
    assert model.config == train_config.model
    initial = Llama(train_config.model, rngs=nnx.Rngs(train_config.train.seed))
    text = jnp.asarray([ByteTokenizer().encode("def main():\n    return 0\n" * 4)])
    assert next_token_loss(model, text) < next_token_loss(initial, text) - 1.0

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in (
        "loss",
        "perplexity",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "nonfinite_steps",
        "skipped_records",
    ):
        assert key in record, key


def next_token_loss(model, tokens) -> float:
    logits = model(tokens[:, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())


def command(workdir: Path, steps: int = 12) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train",
        "--config=configs/tiny_dga.py",
        f"--workdir={workdir}",
        "--config.data.seq_len=128",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=1000",
        "--config.train.checkpoint_every=2",
    ]


def wait_for_step(workdir: Path, step: int, process: subprocess.Popen, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and max(read(workdir, "loss"), default=0) >= step:
            return
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def test_resume_after_sigkill_reproduces_the_losses(tmp_path):
    subprocess.run(command(tmp_path / "whole"), cwd=ROOT, check=True, capture_output=True)
    expected = read(tmp_path / "whole", "loss")
    assert sorted(expected) == list(range(1, 13))

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_for_step(killed, random.randint(3, 9), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run(command(killed), cwd=ROOT, check=True, capture_output=True)
    resumed = read(killed, "loss")
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_array_equal(
        [resumed[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)]
    )


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    process = subprocess.Popen(
        command(tmp_path, steps=500),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "stopped early" in out
    last = max(read(tmp_path, "loss"))
    assert last < 500
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == last


def test_divergence_stops_with_a_clear_message(tmp_path):
    config = tiny(steps=12)
    config.optim.learning_rate = 1e30
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1e30
    config.optim.max_nonfinite_steps = 2
    with pytest.raises(NonFiniteError, match=r"config\.optim\.max_nonfinite_steps=2"):
        run(from_config_dict(config), tmp_path)


def test_main_job_command_is_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert "-m train --config=configs/tiny_dga.py" in makefile
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
