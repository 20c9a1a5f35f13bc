"""`python -m train`'s flags: a mistake in them ends the launch with one `error: ...` line and
exit code 2, before any work (never a silently ignored argument or a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def error_line(cwd: Path, *flags: str, config: str = "configs/tiny_dga.py") -> str:
    """The one line `python -m train --config=<config> *flags` ends with, run in `cwd` (where
    the default workdir, runs/, would go)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    config = f"--config={ROOT / config}"
    result = subprocess.run(
        [sys.executable, "-m", "train", config, "--config.train.steps=1", *flags],
        cwd=cwd,
        env={**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        # A boolean flag takes no separate value: "False" was left over, and add_bos stayed True.
        (
            ["--config.data.add_bos", "False"],
            "error: unexpected argument(s) False: every flag is --name=value",
        ),
        # `--workdir=$DIR` with DIR unset trained (and resumed) in runs/tiny_dga instead.
        (["--workdir="], "error: --workdir is empty: name a directory, or leave it out for runs/"),
        # JAX's ValueError, with its traceback, where it finds no cluster to take peers from.
        (
            ["--workdir=/nonexistent/w", "--distributed"],
            "error: --distributed: coordinator_address should be defined.",
        ),
    ],
    ids=["bool-value-apart", "empty-workdir", "distributed-without-peers"],
)
def test_flag_mistakes_end_the_launch_naming_them(tmp_path, flags, message):
    line = error_line(tmp_path, *flags)
    assert line.startswith(message), line
    assert not (tmp_path / "runs").exists()


def test_a_config_file_without_get_config_is_named(tmp_path):
    # It was "error: unknown config key module 'config_config' has no attribute 'get_config'".
    line = error_line(tmp_path, config="train/step.py")
    assert line == "error: --config: the file defines no get_config() (a configs/*.py file does)"


def test_a_bad_input_found_after_jax_starts_is_the_only_line(tmp_path):
    # JAX's INFO line at backend start ("Unable to initialize backend 'tpu'", where JAX looks
    # for every platform) came first: the input check runs after the devices are listed.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run(
        [sys.executable, "-m", "train", f"--config={ROOT / 'configs/tiny_dga.py'}"]
        + ["--config.data.tokenizer=/nonexistent/tok.model", f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config.data.tokenizer"), lines
    assert not [x for x in lines if "Unable to initialize backend" in x], lines
