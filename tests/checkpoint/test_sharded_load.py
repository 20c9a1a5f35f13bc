"""`load_model` on a mesh of 8 fake CPU devices puts each parameter where the rules say."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from jax.sharding import PartitionSpec as P

from tests.checkpoint.conftest import LOGIT_ATOL, assert_same_params

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sharded_load_matches_the_rules_and_transformers(converted, tmp_path):
    c = converted("llama3_rope")
    np.save(tmp_path / "tokens.npy", c.tokens)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.checkpoint._sharded_load",
            str(c.ckpt_dir),
            str(tmp_path / "tokens.npy"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    params = json.loads((tmp_path / "params.json").read_text())
    # Weights over fsdp and seq (ZeRO-3 over the context-parallel group), heads over tensor.
    assert params["layers.attn.q"]["spec"] == repr(P(None, ("fsdp", "seq"), "tensor", None))
    assert params["embed"]["spec"] == repr(P("tensor", ("fsdp", "seq")))
    for name, where in params.items():
        assert where["spec"] == where["expected"], name
        assert where["devices"] == 8 and where["committed"], name
    assert_same_params(tmp_path / "resaved", c.ckpt_dir)
    diff = float(np.max(np.abs(np.load(tmp_path / "logits.npy") - c.logits)))
    print(f"sharded (1, 2, 2, 2): max |ours - transformers| = {diff:.2e}")
    assert diff <= LOGIT_ATOL
