"""The public layout functions check their inputs as `dga_attention` does: a layout or entries
built from mismatched arrays would otherwise be silently wrong."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import ContextSplit, DGAConfig
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


def test_dga_layout_checks_its_split_against_the_mesh():
    # As dga_attention's: a part count other than the axis size failed deep inside the
    # importance pass ("Incompatible types for broadcasting").
    q, k, _ = random_qkv(3, 1, 16, 2, 1, 8)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))

    def layout(q, k):
        return dga_jax.dga_layout(q, k, CONFIG, 0.3, split=ContextSplit("seq", 2)).focal

    spec = jax.sharding.PartitionSpec(None, "seq")
    sharded = jax.shard_map(layout, mesh=mesh, in_specs=(spec,) * 2, out_specs=spec)
    with pytest.raises(ValueError, match=r"says 2 parts, but mesh axes 'seq' hold 1 devices"):
        jax.jit(sharded)(q, k)
    with pytest.raises(ValueError, match="not bound: call dga_layout inside a jax.shard_map"):
        layout(q, k)


@pytest.mark.parametrize("block", [0, -8, 8.0], ids=["0", "negative", "float"])
def test_dga_layout_rejects_a_bad_importance_block(block):
    q, k, _ = random_qkv(4, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match=rf"block .* must be an int >= 1, got {block!r}"):
        dga_jax.dga_layout(q, k, CONFIG, 0.3, block=block)
