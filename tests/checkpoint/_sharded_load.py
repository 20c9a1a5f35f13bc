"""Child process of `test_sharded_load`: loads a checkpoint onto a (1, 2, 2, 2) mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m tests.checkpoint._sharded_load CKPT TOKENS.npy OUT_DIR

The flag must be set before JAX starts, hence a process of its own. Writes OUT_DIR/logits.npy
([B, T, V] float32, computed under the mesh), OUT_DIR/params.json (for each parameter its
sharding spec, the spec `DEFAULT_RULES` gives its logical axes, its device count and whether it
is committed) and OUT_DIR/resaved (the sharded model saved again with `save_model`).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.checkpoint import load_model, save_model
from dga_jax.sharding import DEFAULT_RULES, make_mesh


def describe(variable: nnx.Param) -> dict[str, object]:
    """Where a loaded parameter lives, and where the rules say it should."""
    array = variable[...]
    return {
        "spec": repr(array.sharding.spec),
        "expected": repr(DEFAULT_RULES.spec(variable.get_metadata()["logical_axes"])),
        "devices": len(array.sharding.device_set),
        "committed": array.committed,
    }


def main(ckpt: str, tokens_file: str, out_dir: str) -> None:
    mesh = make_mesh((1, 2, 2, 2))
    model = load_model(ckpt, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    report = {".".join(path): describe(v) for path, v in nnx.to_flat_state(state)}
    with jax.set_mesh(mesh):
        logits = model(jnp.asarray(np.load(tokens_file)))
    out = pathlib.Path(out_dir)
    np.save(out / "logits.npy", np.asarray(logits))
    (out / "params.json").write_text(json.dumps(report, indent=2))
    save_model(model, out / "resaved")


if __name__ == "__main__":
    main(*sys.argv[1:])
