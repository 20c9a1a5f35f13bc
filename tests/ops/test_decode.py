"""DGA decoding at the op level: the cache, prefill and one-token steps (`docs/DGA_SPEC.md`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax.ops.dense_decode import DenseCache
from dga_jax.ops.dga.capacity import prefill_counts, prefix_capacity
from dga_jax.ops.dga.decode import DGACache, decode_step, prefill
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.dga.reference import dga_decode_reference
from tests.conftest import FORWARD_TOL, assert_close, cache_row, random_qkv

TOL = FORWARD_TOL[jnp.float32]
SCALE = 16**-0.5
step = jax.jit(decode_step)
prefill_jit = jax.jit(prefill, static_argnames=("max_len", "config", "scale", "capacity"))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def decode(q, k, v, prompt_len, config, max_len=None, capacity=None):
    """Prefill `prompt_len` tokens, decode the rest: (outputs [B, L - P, Hq, D], cache)."""
    seq_len = q.shape[1]
    cache = prefill(
        q[:, :prompt_len],
        k[:, :prompt_len],
        v[:, :prompt_len],
        max_len=max_len or seq_len,
        config=config,
        scale=SCALE,
        capacity=capacity,
    )

    def one_token(cache, qkv):
        out, cache = decode_step(*qkv, cache)
        return cache, out

    tokens = [x[:, prompt_len:].swapaxes(0, 1) for x in (q, k, v)]
    cache, outs = jax.lax.scan(one_token, cache, tokens)
    return outs.swapaxes(0, 1), cache


def attention(q, k, v, config):
    return dga_jax.dga_attention(
        q,
        k,
        v,
        group_size=config.group_size,
        focal_ratio=config.focal_ratio,
        selection=config.selection,
        scale=SCALE,
    )


@pytest.mark.parametrize("prompt_len", [0, 23])
@pytest.mark.parametrize("group_size, focal_ratio", [(4, 0.1), (3, 0.5), (4, 0.0)])
def test_streaming_prefill_equals_step_by_step_decoding(prompt_len, group_size, focal_ratio):
    # L = 41: chunks of m' = 5, 6 or 4 leave an incomplete last chunk; GQA, batch 2.
    q, k, v = random_qkv(0, 2, 41, 4, 2, 16)
    config = dga_jax.DGAConfig(group_size, focal_ratio, "streaming")
    out, _ = decode(q, k, v, prompt_len, config)
    assert_close(out, attention(q, k, v, config)[:, prompt_len:], TOL)


@pytest.mark.parametrize("prompt_len", [0, 12])
def test_one_hot_heads_decode_as_they_prefill(prompt_len, optimized):
    # Two query heads near one-hot on two keys of one chunk (logits ~ N(0, 25^2)): their tail
    # scores tie at 1 in float32. Prefill and decoding computed them by differently fused
    # expressions (scaled products minus their max, one multiply-subtract in optimized code)
    # and promoted different keys: off by 1.1.
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (1, 30, 2, 8)) * 5.0
    k = jax.random.normal(keys[1], (1, 30, 1, 8)) * 5.0
    v = jax.random.normal(keys[2], (1, 30, 1, 8))
    config = dga_jax.DGAConfig(4, 0.2, "streaming")
    p = prompt_len
    cache = dga_jax.prefill(q[:, :p], k[:, :p], v[:, :p], max_len=30, config=config)
    outs = []
    one_step = jax.jit(decode_step)  # compiled here, optimized
    for t in range(p, 30):  # a step at a time, as generation calls it
        out, cache = one_step(q[:, t], k[:, t], v[:, t], cache)
        outs.append(out)
    want = dga_jax.dga_attention(q, k, v, config)[:, p:]
    assert_close(jnp.stack(outs, axis=1), want, TOL)


@pytest.mark.parametrize("selection", ["global", "streaming"])
@pytest.mark.parametrize("focal_ratio", [0.0, 0.1, 0.5, 1.0])
def test_decoding_after_prefill_matches_the_spec_rule(selection, focal_ratio):
    q, k, v = random_qkv(1, 2, 50, 4, 2, 16)
    config = dga_jax.DGAConfig(4, focal_ratio, selection)
    out, _ = decode(q, k, v, 29, config)
    assert_close(out, dga_decode_reference(q, k, v, config, SCALE, 29), TOL)


def test_decoding_after_global_prefill_differs_from_streaming():
    # The two selections give different caches, so the reference comparison above can fail.
    q, k, v = random_qkv(1, 1, 40, 2, 2, 16)
    outs = [decode(q, k, v, 25, dga_jax.DGAConfig(4, 0.25, s))[0] for s in ("global", "streaming")]
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3


@pytest.mark.parametrize("selection", ["global", "streaming"])
@pytest.mark.parametrize("group_size, focal_ratio", [(4, 1.0), (1, 0.1)])
def test_all_focal_or_groups_of_one_equal_dense_decoding(selection, group_size, focal_ratio):
    q, k, v = random_qkv(2, 2, 33, 4, 2, 16)
    dense, _ = decode(q, k, v, 11, None)
    out, _ = decode(q, k, v, 11, dga_jax.DGAConfig(group_size, focal_ratio, selection))
    assert_close(out, dense, TOL)


def test_dense_decoding_equals_dense_attention():
    q, k, v = random_qkv(3, 2, 30, 4, 2, 16)
    out, cache = decode(q, k, v, 9, None, max_len=40)
    assert isinstance(cache, DenseCache) and cache.k.shape == (2, 2, 40, 16)
    np.testing.assert_array_equal(cache.length, [30, 30])
    full = dga_jax.dense_attention(q, k, v, scale=SCALE)
    assert_close(out, full[:, 9:], TOL)


@pytest.mark.parametrize(
    "config",
    [None, dga_jax.DGAConfig(4, 0.1), dga_jax.DGAConfig(4, 0.2, "streaming")],
    ids=["dense", "global", "streaming"],
)
def test_a_padded_prefill_gives_each_row_its_cache_alone(config):
    # Right-padded rows prefilled in one call (lengths below m, not multiples of m or m' = 5),
    # then decoded together == each prompt prefilled at its own length and decoded alone.
    q, k, v = random_qkv(4, 4, 40, 4, 2, 16)
    lengths, steps, max_len = [30, 3, 13, 26], 6, 40
    prefill_rows = functools.partial(prefill_jit, max_len=max_len, config=config, scale=SCALE)
    cache = prefill_rows(q[:, :30], k[:, :30], v[:, :30], lengths=jnp.asarray(lengths))
    for i, n in enumerate(lengths):
        alone = prefill_rows(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
        for name, want in cache_row(alone, 0).items():
            np.testing.assert_allclose(cache_row(cache, i)[name], want, rtol=1e-6, err_msg=name)
    outs = [decode(q[i : i + 1], k[i : i + 1], v[i : i + 1], n, config)[0] for i, n in
            enumerate(lengths)]  # fmt: skip
    rows = np.arange(len(lengths))
    for n in range(steps):
        t = np.array(lengths) + n
        out, cache = step(q[rows, t], k[rows, t], v[rows, t], cache)
        for i in rows:
            assert_close(out[i], outs[i][0, n], TOL)


def test_rows_prefilled_apart_concatenate_into_one_batch():
    # Rows prefilled at their own lengths, concatenated, decoded together == decoded alone.
    config = dga_jax.DGAConfig(4, 0.1)
    q, k, v = random_qkv(4, 2, 40, 4, 2, 16)
    lengths, steps, max_len = (13, 26), 10, 40
    capacity = prefix_capacity(config, max_len, lengths)
    rows = [
        prefill_jit(q[i : i + 1, :p], k[i : i + 1, :p], v[i : i + 1, :p], max_len=max_len,
                config=config, scale=SCALE, capacity=capacity)
        for i, p in enumerate(lengths)
    ]  # fmt: skip
    cache = jax.tree.map(concat_rows, *rows)
    alone = [decode(q[i : i + 1], k[i : i + 1], v[i : i + 1], p, config, max_len)[0] for i, p in
             enumerate(lengths)]  # fmt: skip
    for n in range(steps):
        t = np.array(lengths) + n
        out, cache = step(q[[0, 1], t], k[[0, 1], t], v[[0, 1], t], cache)
        for i in range(len(lengths)):
            assert_close(out[i], alone[i][0, n], TOL)


def concat_rows(*rows):
    return jnp.concatenate(rows, axis=0)


@pytest.mark.parametrize(
    "selection, prompt_len", [("global", 0), ("global", 37), ("streaming", 10)]
)
def test_prefix_capacity_is_what_decoding_fills(selection, prompt_len):
    config = dga_jax.DGAConfig(4, 0.1, selection)
    q, k, v = random_qkv(5, 1, 60, 2, 1, 16)
    _, cache = decode(q, k, v, prompt_len, config)
    assert isinstance(cache, DGACache)
    capacity = prefix_capacity(config, 60, [prompt_len])
    assert cache.prefix_k.shape[2] == capacity
    assert int(cache.prefix_count[0]) == capacity
    assert int(cache.length[0]) == 60
    assert prefill_counts(config, prompt_len)[1] < config.chunk_size


def test_cache_is_about_a_sixth_of_dense_at_the_paper_setting():
    config = dga_jax.DGAConfig(16, 0.1)
    assert prefix_capacity(config, 4096 + 64, [4096]) / (4096 + 64) < 0.16


@pytest.mark.parametrize("lengths", [[], [4, -1], [[4, 5]], [4.7], np.array([3.0])])
def test_prefix_capacity_names_bad_prompt_lengths(lengths):
    # [] failed in NumPy's max of an empty array; a negative length sized a wrong cache; float
    # lengths were cut to integers (4.7 sized the cache of a 4-token prompt).
    with pytest.raises(ValueError, match=r"prompt_lengths must be one or more lengths >= 0"):
        prefix_capacity(dga_jax.DGAConfig(4, 0.25), 64, lengths)


def test_overflow_raises_before_running():
    q, k, v = random_qkv(6, 1, 20, 2, 1, 16)
    config = dga_jax.DGAConfig(4, 0.1)
    with pytest.raises(ValueError, match="max_len=16 tokens but 20 are needed"):
        prefill(q, k, v, max_len=16, config=config)
    with pytest.raises(ValueError, match="max_len=10 tokens but 12 are needed"):
        prefix_capacity(config, 10, [5, 12])
    needed = prefix_capacity(config, 30, [20])
    with pytest.raises(ValueError, match=f"capacity={needed - 1} prefix slots are too few"):
        prefill(q, k, v, max_len=30, config=config, capacity=needed - 1)


def test_a_capacity_too_small_for_padded_prompts_raises_or_decodes_nan():
    q, k, v = random_qkv(6, 1, 40, 2, 1, 16)
    config, lengths = dga_jax.DGAConfig(4, 0.1), np.array([20])
    needed = prefix_capacity(config, 40, lengths)
    short = functools.partial(
        prefill, q[:, :20], k[:, :20], v[:, :20], max_len=40, config=config, capacity=needed - 1
    )
    with pytest.raises(ValueError, match=f"capacity={needed - 1} prefix slots are too few"):
        short(lengths=lengths)

    @jax.jit  # traced lengths: nothing to check on the host; the overflowing row turns NaN
    def run(lengths):
        steps = (q[:, 20:].swapaxes(0, 1), k[:, 20:].swapaxes(0, 1), v[:, 20:].swapaxes(0, 1))
        step = lambda cache, x: decode_step(*x, cache)[::-1]  # noqa: E731
        return jax.lax.scan(step, short(lengths=lengths), steps)[1]

    out = run(lengths)  # [steps, B, Hq, D]
    finite = np.asarray(jnp.isfinite(out).all(axis=(1, 2, 3)))
    overflow = int(np.argmin(finite))  # the first step after the flush that overflows
    assert not finite[overflow:].any() and finite[:overflow].all() and overflow > 0


@pytest.mark.parametrize("config", [None, dga_jax.DGAConfig(4, 0.1)])
def test_a_step_past_max_len_gives_nan_not_a_dropped_token(config):
    q, k, v = random_qkv(7, 1, 12, 2, 1, 16)
    out, _ = decode(q, k, v, 4, config, max_len=11)
    assert bool(jnp.all(jnp.isfinite(out[:, :-1])))
    assert bool(jnp.all(jnp.isnan(out[:, -1])))


def test_dense_prefill_refuses_float_lengths():
    # config=None is the dense cache: float lengths were truncated to int32 ([4.7, 8] -> [4, 8]).
    q, k, v = random_qkv(0, 2, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \(2,\)"):
        prefill(q, k, v, max_len=16, lengths=jnp.array([4.7, 8.0]))


STEP_MISMATCHES = {
    # (q, k, v) of one token against the cache's B=2 rows, Hkv=2 KV heads, D=16.
    "one-kv-head": (lambda q, k, v: (q, k[:, :1], v[:, :1]), "k and v must be"),  # broadcast
    "v-differs": (lambda q, k, v: (q, k, v[:, :1]), "k and v must be"),  # broadcast
    "one-row": (lambda q, k, v: (q[:1], k[:1], v[:1]), "k and v must be"),
    "head-dim": (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "k and v must be"),
    "rank-4": (lambda q, k, v: (q[:, None], k[:, None], v[:, None]), "k and v must be"),
    "hq-3": (lambda q, k, v: (q[:, :3], k, v), "q must be .B, Hq, D. with Hq a multiple of Hkv"),
    "int": (lambda q, k, v: (q.astype(jnp.int32), k, v), "q must be floating point"),
}


@pytest.mark.parametrize("mismatch", STEP_MISMATCHES)
@pytest.mark.parametrize("config", [None, dga_jax.DGAConfig(4, 0.25)], ids=["dense", "dga"])
def test_a_step_that_does_not_fit_the_cache_is_named(config, mismatch):
    # A token with one KV head (or one v head) was broadcast into every head of the cache and
    # decoded silently; other mismatches failed deep in a reshape or concatenate.
    q, k, v = random_qkv(8, 2, 9, 4, 2, 16)
    cache = prefill(q[:, :8], k[:, :8], v[:, :8], max_len=12, config=config)
    make, message = STEP_MISMATCHES[mismatch]
    with pytest.raises(ValueError, match=f"decode step: {message}"):
        decode_step(*make(q[:, 8], k[:, 8], v[:, 8]), cache)


PREFILL_MISTAKES = {
    "hq-3": (dict(q=lambda q: q[:, :, :3]), "Hq=3 must be a multiple of KV heads Hkv=2"),
    "v-heads": (dict(v=lambda v: v[:, :, :1]), "k and v must have the same shape"),
    "kv-one-row": (dict(k=lambda k: k[:1], v=lambda v: v[:1]), "must agree on batch B"),
    "empty-v-heads": (
        dict(q=lambda q: q[:, :0], k=lambda k: k[:, :0], v=lambda v: v[:, :0, :1]),
        r"k and v must have the same shape.*an empty prompt",
    ),
    "max_len-float": (dict(max_len=20.0), "max_len must be an int"),
    "capacity-float": (dict(capacity=30.0), r"capacity must be an int >= 0"),
    "capacity-negative": (dict(capacity=-1), r"capacity must be an int >= 0"),
    "scale-negative": (dict(scale=-1.0), "scale must be a positive finite number"),
    "config-str": (dict(config="dga"), "config must be a DGAConfig or None"),
    "layout-str": (dict(layout="x"), r"layout must be a DGALayout .* got 'x'"),
}


@pytest.mark.parametrize("mistake", PREFILL_MISTAKES)
@pytest.mark.parametrize("config", [None, dga_jax.DGAConfig(4, 0.25)], ids=["dense", "dga"])
def test_prefill_names_bad_arguments(config, mistake):
    # The dense cache checked nothing (a v of fewer heads, a negative scale, a batch mismatch
    # made a cache that failed or broadcast later); DGA took a float max_len as static
    # metadata, and a float capacity or a config of the wrong type failed deep inside.
    q, k, v = random_qkv(9, 2, 12, 4, 2, 8)
    changes, message = PREFILL_MISTAKES[mistake]
    arrays = dict(q=q, k=k, v=v)
    args = dict(max_len=20, config=config)
    for name, change in changes.items():
        if name in arrays:
            arrays[name] = change(arrays[name])
        else:
            args[name] = change
    with pytest.raises(ValueError, match=message):
        prefill(**arrays, **args)


def test_a_layout_without_a_config_and_a_cache_of_no_kind_are_refused():
    # The layout was ignored (a dense cache); a None or other cache: an AttributeError.
    q, k, v = random_qkv(10, 2, 12, 4, 2, 8)
    layout = dga_layout(q, k, dga_jax.DGAConfig(4, 0.25), None)
    with pytest.raises(ValueError, match=r"layout= is DGA's selection, but config=None"):
        prefill(q, k, v, max_len=20, layout=layout)
    for cache in (None, layout):
        with pytest.raises(ValueError, match=r"cache must be a cache from prefill"):
            decode_step(q[:, 0], k[:, 0], v[:, 0], cache)
    with pytest.raises(ValueError, match=r"layout must be a DGALayout .* got 'x'"):
        dga_jax.gather_entries("x", k, v)


@pytest.mark.parametrize(
    "other", [dga_jax.DGAConfig(4, 0.5), dga_jax.DGAConfig(4, 0.25, "streaming")]
)
def test_a_layout_built_for_another_config_is_refused(other):
    # Its focal tokens and groups were read with the counts of `config`: a silently wrong cache.
    q, k, v = random_qkv(10, 2, 12, 4, 2, 8)
    layout = dga_layout(q, k, other, None)
    with pytest.raises(ValueError, match=r"layout was built for LayoutSizes\(seq_len=12"):
        prefill(q, k, v, max_len=20, config=dga_jax.DGAConfig(4, 0.25), layout=layout)


def test_a_layout_carries_its_rows_lengths_into_the_cache():
    # `dga_attention(layout=)` refuses lengths= beside a layout (it holds them), so a caller
    # passes the same layout to prefill alone: every row was counted P long, prefix slots the
    # layout left empty read as entries, and the next token's output was wrong (by 0.8 here).
    config = dga_jax.DGAConfig(4, 0.25)
    q, k, v = random_qkv(11, 2, 21, 4, 2, 8)
    lengths = jnp.array([20, 7])
    layout = dga_layout(q[:, :20], k[:, :20], config, None, lengths=lengths)
    prompt = (q[:, :20], k[:, :20], v[:, :20])
    given = prefill(*prompt, max_len=24, config=config, lengths=lengths)
    from_layout = prefill(*prompt, max_len=24, config=config, layout=layout)
    assert from_layout.length.tolist() == [20, 7]
    np.testing.assert_array_equal(from_layout.prefix_count, given.prefix_count)
    np.testing.assert_array_equal(from_layout.tail_count, given.tail_count)
    out, _ = decode_step(q[:, 20], k[:, 20], v[:, 20], from_layout)
    want, _ = decode_step(q[:, 20], k[:, 20], v[:, 20], given)
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_lengths_other_than_the_layouts_are_refused():
    config = dga_jax.DGAConfig(4, 0.25)
    q, k, v = random_qkv(12, 2, 20, 4, 2, 8)
    whole = dga_layout(q, k, config, None)
    with pytest.raises(ValueError, match="the layout was built without them"):
        prefill(q, k, v, max_len=24, config=config, lengths=jnp.array([20, 7]), layout=whole)
    padded = dga_layout(q, k, config, None, lengths=jnp.array([20, 7]))
    with pytest.raises(ValueError, match=r"lengths=\[20, 8\], but the layout was built with"):
        prefill(q, k, v, max_len=24, config=config, lengths=jnp.array([20, 8]), layout=padded)


def test_apply_update_refuses_another_kinds_update():
    # A dense cache's update written into a DGA cache was an AttributeError inside `apply`.
    from dga_jax.ops.dga.decode import apply_update

    q, k, v = random_qkv(0, 1, 8, 2, 1, 8)
    dga = prefill(q, k, v, max_len=12, config=dga_jax.DGAConfig(4, 0.25))
    dense = prefill(q, k, v, max_len=12)
    _, dense_update = dense.attend(q[:, 0], k[:, 0], v[:, 0])
    message = r"into a DGACache only its own kind of update \(DGAUpdate\), got a DenseUpdate"
    with pytest.raises(ValueError, match=message):
        apply_update(dga, dense_update)
    _, dga_update = dga.attend(q[:, 0], k[:, 0], v[:, 0])
    assert isinstance(apply_update(dga, dga_update), DGACache)
