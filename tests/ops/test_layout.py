"""The layout: importance, selection and the compressed KV' with its visibility intervals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import chunk_entries, gather_entries
from dga_jax.ops.dga.layout import dga_layout, layout_block_ranges
from dga_jax.ops.dga.selection import global_importance, sampled_positions, top_r_mask
from dga_jax.ops.intervals import NEVER, interval_attention
from dga_jax.ops.tiles import BlockSizes
from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

CONFIGS = [
    DGAConfig(4, 0.1, "global"),
    DGAConfig(4, 0.5, "global"),
    DGAConfig(3, 0.0, "global"),
    DGAConfig(16, 0.1, "global"),
    DGAConfig(4, 0.2, "streaming"),
    DGAConfig(4, 0.0, "streaming"),
    DGAConfig(16, 0.1, "streaming"),
]


@functools.cache
def layout_for(config: DGAConfig, seq_len: int = 75):
    q, k, _ = random_qkv(0, 2, seq_len, 4, 2, 8)
    layout = jax.jit(dga_layout, static_argnums=(2, 3))(q, k, config, 8**-0.5)
    return jax.tree.map(np.asarray, layout)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_past_position_is_counted_once(config):
    layout = layout_for(config)
    seq_len, m = layout.sizes.seq_len, layout.sizes.group_size
    t = np.arange(seq_len)[:, None]
    for b, h in np.ndindex(layout.focal.shape[:2]):
        counts = np.zeros((seq_len, seq_len), int)  # [query t, position p]
        is_group = layout.prefix_is_group[b, h]
        src, start = layout.prefix_src[b, h], layout.prefix_from[b, h]
        focal_pos = src[~is_group]
        counts[:, focal_pos] += start[~is_group][None, :] <= t
        raw_visible = (layout.raw_pos[b, h][None, :] <= t) & (t < layout.raw_until[b, h][None, :])
        counts[:, layout.raw_pos[b, h]] += raw_visible
        members = layout.raw_pos[b, h][: layout.sizes.num_groups * m].reshape(-1, m)
        for g, group_start in zip(src[is_group], start[is_group], strict=True):
            counts[:, members[g]] += group_start <= t
        np.testing.assert_array_equal(counts, np.tril(np.ones_like(counts)))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_lists_are_sorted_and_weights_normalised(config):
    layout = layout_for(config)
    assert np.all(np.diff(layout.prefix_from, axis=-1) >= 0)
    assert np.all(np.diff(layout.raw_pos, axis=-1) > 0)
    assert np.all(np.diff(layout.raw_until, axis=-1) >= 0)
    assert np.all(layout.raw_until >= layout.raw_pos)  # a last member: [p, p), its group shows
    assert np.all(layout.group_weight >= 0)
    np.testing.assert_allclose(layout.group_weight.sum(-1), 1.0, rtol=1e-6)
    assert layout.focal.sum(-1).min() == layout.focal.sum(-1).max() == layout.sizes.num_focal


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("block_q", [1, 8, 32])
def test_raw_band_is_narrow(config, block_q):
    layout = layout_for(config)
    ranges = jax.tree.map(np.asarray, layout_block_ranges(layout, block_q))
    lag = max(layout.sizes.chunk, layout.sizes.group_size) - 1
    assert np.all(ranges.band_end - ranges.band_start <= block_q + lag)
    # The prefix walk is monotone: later blocks see at least what earlier ones do.
    assert np.all(np.diff(ranges.prefix_end, axis=-1) >= 0)


def test_global_importance_matches_definition():
    seq_len, m = 70, 4
    q, k, _ = random_qkv(1, 2, seq_len, 4, 2, 8)
    scale = 0.3
    s = global_importance(q, k, m, scale, block=8)  # 8-key tiles: many tiles, a ragged last one
    logits = jnp.einsum("bjhd,bihd->bhji", q, jnp.repeat(k, 2, axis=2)) * scale
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    sampled = sampled_positions(seq_len, m)
    expected = probs[:, :, sampled].sum(axis=2).reshape(2, 2, 2, seq_len).sum(axis=2)
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)


PADDED_LENGTHS = [75, 1, 18, 57]  # below m = 4, not multiples of m, a multiple of m' = 18


@pytest.mark.parametrize("lengths", [PADDED_LENGTHS, [20, 9, 1, 33]], ids=["long", "all-short"])
def test_global_importance_of_a_padded_row_is_its_own(lengths):
    # 8-key tiles of 2 sampled queries: tiles seen whole, edge tiles, and (all-short) tiles of
    # padding rows only.
    q, k, _ = random_qkv(3, len(lengths), 75, 4, 2, 8)
    s = global_importance(q, k, 4, 0.3, block=8, lengths=jnp.asarray(lengths))
    for b, n in enumerate(lengths):
        alone = global_importance(q[b : b + 1, :n], k[b : b + 1, :n], 4, 0.3, block=8)
        np.testing.assert_allclose(s[b, :, :n], alone[0], rtol=1e-5, atol=1e-6)
        assert (s[b, :, n:] == 0).all()


def test_sampled_positions():
    np.testing.assert_array_equal(sampled_positions(10, 4), [3, 7, 9])
    np.testing.assert_array_equal(sampled_positions(8, 4), [3, 7])
    np.testing.assert_array_equal(sampled_positions(3, 4), [2])


@pytest.mark.parametrize("r", [0, 1, 7, 30, 64])
def test_top_r_mask_breaks_ties_by_position(r):
    rng = np.random.default_rng(r)
    score = rng.integers(0, 5, size=(3, 64)).astype(np.float32)  # many exact ties
    score[0] = 0.0  # all tied
    score[1, 10] = np.inf
    mask = np.asarray(top_r_mask(jnp.asarray(score), r))
    for row, row_mask in zip(score, mask, strict=True):
        expected = np.zeros(64, bool)
        expected[np.argsort(-row, kind="stable")[:r]] = True
        np.testing.assert_array_equal(row_mask, expected)


def test_streaming_promotes_r_prime_per_complete_chunk():
    config = DGAConfig(4, 0.2, "streaming")  # r' = 1, m' = 5
    layout = layout_for(config)
    chunks = layout.sizes.seq_len // config.chunk_size
    per_chunk = layout.focal[..., : chunks * 5].reshape(2, 2, chunks, 5).sum(-1)
    assert config.chunk_focal == 1
    assert np.all(per_chunk == 1)
    assert not layout.focal[..., chunks * 5 :].any()
    assert np.all(layout.raw_until[..., layout.sizes.num_groups * 4 :] == NEVER)


@pytest.mark.parametrize(
    "selection, per_token",
    # global: gamma + (1 - gamma)/m; streaming: (r' + 1)/m' with r' = 2, m' = 18.
    [("global", 0.1 + 0.9 / 16), ("streaming", 3 / 18)],
)
def test_compressed_size_matches_spec_cost(selection, per_token):
    # KV' = focal + groups + raw leftovers: about 16% of dense at m = 16, gamma = 0.1.
    config = DGAConfig(16, 0.1, selection)
    for seq_len in (4096, 32768):
        sizes = config.sizes(seq_len)
        leftover = sizes.num_raw - sizes.num_groups * sizes.group_size
        entries = sizes.num_prefix + leftover
        assert abs(entries - per_token * seq_len) <= config.chunk_size
        assert entries / seq_len < 0.17


@pytest.mark.parametrize("config", CONFIGS + [DGAConfig(4, 1.0, "global")], ids=str)
def test_a_padded_row_has_the_layout_of_its_own_length(config):
    q, k, _ = random_qkv(0, len(PADDED_LENGTHS), 75, 4, 2, 8)
    build = jax.jit(dga_layout, static_argnums=(2, 3))
    layout = build(q, k, config, 8**-0.5, lengths=jnp.asarray(PADDED_LENGTHS))
    for b, n in enumerate(PADDED_LENGTHS):
        alone = build(q[b : b + 1, :n], k[b : b + 1, :n], config, 8**-0.5)
        n_prefix, n_raw, n_groups = (
            alone.sizes.num_prefix,
            alone.sizes.num_raw,
            alone.sizes.num_groups,
        )
        np.testing.assert_array_equal(layout.focal[b, :, :n], alone.focal[0])
        assert not layout.focal[b, :, n:].any()  # padding is never focal
        for name in ("prefix_src", "prefix_is_group", "prefix_from", "raw_pos", "raw_until"):
            size = n_prefix if name.startswith("prefix") else n_raw
            np.testing.assert_array_equal(
                getattr(layout, name)[b, :, :size], getattr(alone, name)[0]
            )
        np.testing.assert_allclose(
            layout.group_weight[b, :, :n_groups], alone.group_weight[0], rtol=1e-6
        )
        # The rest of the row: prefix slots never visible, padding as raw tokens from their own
        # position on, never seen by a position < n.
        assert (layout.prefix_from[b, :, n_prefix:] == NEVER).all()
        assert (layout.raw_pos[b, :, n_raw:] >= n).all()
        assert (layout.raw_until[b, :, n_raw:] == NEVER).all()


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.selection == "streaming"], ids=str)
@pytest.mark.parametrize("lengths", [None, PADDED_LENGTHS], ids=["whole", "padded"])
@pytest.mark.parametrize("periodic", [False, True], ids=["windows", "periods"])
def test_chunk_entries_attend_as_the_gathered_lists(config, lengths, periodic):
    # The same visible set in another arrangement: equal outputs and gradients at every valid
    # position, through walks of several blocks (whole, edge and band tiles); the chunk band
    # read in windows (band_lag) or a chunk at a time (band_period, query blocks of whole chunks).
    q, k, v = random_qkv(5, len(PADDED_LENGTHS), 75, 4, 2, 8)
    rows = jnp.asarray(lengths or [75] * len(PADDED_LENGTHS))
    valid = (jnp.arange(75)[None, :] < rows[:, None])[..., None, None]
    layout = dga_layout(q, k, config, 0.3, lengths=None if lengths is None else rows)
    blocks = BlockSizes(block_q=16, block_k=16, block_band=8, block_edge=8)
    lag = max(config.chunk_size, config.group_size) - 1
    cotangent = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape) * valid

    def run(entries, period=0):
        def loss(q, k, v):
            prefix, band = entries(layout, k, v)
            out = interval_attention(
                q, prefix, band, scale=0.3, block_sizes=blocks, band_lag=lag, band_period=period
            )
            return jnp.sum(out * cotangent), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, got), got_grads = run(chunk_entries, config.chunk_size if periodic else 0)
    (_, want), want_grads = run(gather_entries)
    assert_close(got * valid, want * valid, FORWARD_TOL[jnp.float32])
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a * valid, b * valid, GRAD_TOL[jnp.float32])


def test_a_band_period_needs_one_band_entry_per_position():
    config = DGAConfig(4, 0.2, "streaming")
    q, k, v = random_qkv(5, 1, 40, 4, 2, 8)
    prefix, band = chunk_entries(dga_layout(q, k, config, 0.3), k, v)
    attend = functools.partial(interval_attention, scale=0.3, band_lag=4)
    short = jax.tree.map(lambda x: x[:, :, :-1], band)
    with pytest.raises(ValueError, match="one entry per position: got 39 entries for 40"):
        attend(q, prefix, short, band_period=5)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="band_period must be an int >= 0"):
            attend(q, prefix, band, band_period=bad)
    # Without a band the period has nothing to say: the prefix alone, as with none.
    assert_close(
        attend(q, prefix, None, band_period=5), attend(q, prefix, None), FORWARD_TOL[jnp.float32]
    )
