"""Stands in for `python3` when `test_device_check.py` runs `benchmarks/device_check.sh` on this
host: each benchmark's command line is parsed as on the GPU machine (its `parse_args`, with
`jax.default_backend()` reading "gpu"), the tests step is collected (not run), and the device
step runs as written. Nothing is measured or compiled."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import jax


def main(args: list[str]) -> int:
    if args[0] == "-c":  # the device step: versions and devices
        exec(args[1])
        return 0
    if args[:2] == ["-m", "pytest"]:
        import pytest

        return pytest.main(["--collect-only", *args[2:]])
    script = Path(args[0])
    sys.path.insert(0, str(script.parent))
    jax.default_backend = lambda: "gpu"  # the flags as the GPU machine reads them
    parsed = importlib.import_module(script.stem).parse_args(args[1:])
    print(f"parsed {script.name}: {sorted(vars(parsed))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
