"""The public layout functions check their inputs as `dga_attention` does: a layout or entries
built from mismatched arrays would otherwise be silently wrong."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import DGAConfig
from tests.conftest import random_qkv

CONFIG = DGAConfig(4, 0.25)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=slice(0, 40)), r"q and k/v must agree on length L \(axis 1\)"),
        (dict(lengths=jnp.array([3.5, 48.0])), r"lengths must be integers of shape \(2,\)"),
        (dict(lengths=jnp.array([100, 48])), r"lengths must lie in \[1, L\] = \[1, 48\]"),
        (dict(lengths=jnp.array([30, 48, 48])), r"lengths must be integers of shape \(2,\)"),
        (dict(config={"group_size": 4}), "config must be a DGAConfig, got dict"),
    ],
    ids=["k-shorter", "float-lengths", "lengths-past-L", "lengths-per-row", "config-dict"],
)
def test_dga_layout_rejects_mismatched_inputs(change, message):
    q, k, _ = random_qkv(0, 2, 48, 4, 2, 8)
    if "k" in change:
        k = k[:, change.pop("k")]
    config = change.pop("config", CONFIG)
    with pytest.raises((ValueError, TypeError), match=message):
        dga_jax.dga_layout(q, k, config, 0.3, **change)


def test_dga_layout_default_scale_is_dga_attentions():
    q, k, _ = random_qkv(1, 1, 24, 2, 1, 8)
    by_default = dga_jax.dga_layout(q, k, CONFIG, None)
    given = dga_jax.dga_layout(q, k, CONFIG, 8**-0.5)
    np.testing.assert_array_equal(np.asarray(by_default.score), np.asarray(given.score))


@pytest.mark.parametrize(
    "rows", [np.s_[:, :40], np.s_[:, :, :1], np.s_[:1]], ids=["length", "heads", "batch"]
)
def test_gather_entries_rejects_another_layouts_kv(rows):
    q, k, v = random_qkv(2, 2, 48, 4, 2, 8)
    layout = dga_jax.dga_layout(q, k, CONFIG, 0.3)
    shapes = r"must be \[B, L, Hkv, D\] with \[B, Hkv, L\] = \[2, 2, 48\]"
    with pytest.raises(ValueError, match=shapes):
        dga_jax.gather_entries(layout, k[rows], v[rows])
