"""`train.checkpointing.Checkpoints` on its own: which steps it saves."""

from __future__ import annotations

import jax.numpy as jnp

from train.checkpointing import Checkpoints
from train.step import TrainState


def test_saves_every_n_steps_and_on_demand_only(tmp_path):
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(zero, {"w": jnp.ones(2)}, {}, zero, zero)
    checkpoints = Checkpoints(tmp_path / "checkpoints", every=2, keep=5)
    try:
        saved = [checkpoints.save(step, state, dict, {}) for step in (1, 2, 3, 4)]
        saved.append(checkpoints.save(5, state, dict, {}, force=True))
    finally:
        checkpoints.close()
    assert saved == [False, True, False, True, True]  # not the first step of a fresh run
    assert checkpoints.steps() == [2, 4, 5]
