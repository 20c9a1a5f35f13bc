"""`benchmarks/device_check.sh`, the one call a lent GPU gets, run on this host with `python3`
standing in (`device_check_python.py`): every step's flags must parse as on the GPU and the
tests step must select tests. A typo there would cost a device session's minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["device", "profile", "launch", "tests", "attention", "train_step", "decode", "importance"]


def test_every_step_of_the_device_check_parses(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    driver = Path(__file__).with_name("device_check_python.py")
    stand_in.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} {driver} "$@"\n')
    stand_in.chmod(0o755)
    (tmp_path / "out").mkdir()  # the device tool's $OUT: an empty folder
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        ["bash", "benchmarks/device_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.findall(r"^== (\w+) \(at most", result.stdout, re.M) == STEPS
    parsed = re.findall(r"^parsed (\w+)\.py", result.stdout, re.M)
    benchmarks = ["profile_attention", "attention", "attention", "train_step", "decode"]
    assert parsed == [*benchmarks, "importance"]
    selected = re.search(r"(\d+)/\d+ tests collected", result.stdout)
    assert selected and int(selected[1]) > 0, result.stdout[-2000:]
    assert (tmp_path / "out" / "device_check.tgz").is_file()  # what the device tool brings back
    # The pytest it started (the tests step, collected) left this run's compilation cache be.
    assert os.path.isdir(os.environ["JAX_COMPILATION_CACHE_DIR"])
