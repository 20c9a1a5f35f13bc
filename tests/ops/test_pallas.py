"""The Pallas kernels beyond the shared conformance suite.

On CPU the kernels run in interpret mode (the TPU interpreter checks races and out-of-bounds
reads); on a GPU the Triton kernels run compiled. This file adds inputs long enough to cross
many entry blocks, more block sizes, the on-device block ranges against brute force, and the
lowering of forward and backward to Triton and Mosaic, which checks what the kernels ask of each
compiler without the hardware.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import dga_jax
from dga_jax import BlockSizes
from dga_jax.ops.context import WHOLE
from dga_jax.ops.dga import backends, pallas_gpu_importance
from dga_jax.ops.dga import pallas_common as common
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.dga.pallas_tpu_backward import step_list
from dga_jax.ops.dga.selection import XLA_PASSES, ImportanceTiles, global_importance
from dga_jax.ops.intervals import NEVER
from tests.conftest import (
    FORWARD_TOL,
    GPU_INTERPRET,
    GRAD_TOL,
    ON_GPU,
    RACE_REPORT,
    TPU_INTERPRET,
    assert_close,
    random_qkv,
)

GPU = dict(implementation="pallas_gpu", interpret=GPU_INTERPRET)
TPU = dict(implementation="pallas_tpu", interpret=TPU_INTERPRET)


def _loss(fn, weights):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    return loss


def _check_against_xla(kernel_kwargs, qkv, dga_kwargs, dtype=jnp.float32):
    """Forward and gradients of the kernel equal the XLA path on the same inputs.

    The kernel's results are waited for before the XLA path compiles: an interpreted kernel
    runs long on host callbacks, and XLA:CPU compiling beside it crashed the process (a
    segfault in `backend_compile_and_load`, seen only deep into the full suite, JAX 0.10.2).
    """
    q, k, v = qkv
    kernel = functools.partial(dga_jax.dga_attention, **kernel_kwargs, **dga_kwargs)
    xla = functools.partial(dga_jax.dga_attention, implementation="xla", **dga_kwargs)
    assert_close(jax.block_until_ready(kernel(q, k, v)), xla(q, k, v), FORWARD_TOL[dtype])
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    grads = jax.block_until_ready(jax.grad(_loss(kernel, weights), argnums=(0, 1, 2))(q, k, v))
    expected = jax.grad(_loss(xla, weights), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, GRAD_TOL[dtype])


@pytest.mark.parametrize(
    "selection, block_q, block_k",
    # L = 120 is a multiple of none of the query blocks.
    [("global", 16, 16), ("streaming", 32, 16), ("global", 16, 64)],
)
def test_gpu_kernels_many_blocks(selection, block_q, block_k):
    # m = 2, gamma = 0.5: ~90 prefix entries and ~60 raw ones, so many blocks of each list.
    qkv = random_qkv(3, 2, 120, 4, 2, 16)
    kwargs = dict(GPU, block_sizes=BlockSizes(block_q, block_k, 16, 32))
    _check_against_xla(kwargs, qkv, dict(group_size=2, focal_ratio=0.5, selection=selection))


def test_gpu_kernels_at_their_default_tiles():
    # bfloat16, D = 128: the 128 x 64 default (compiled on a GPU, whose register budget it nears);
    # L = 200 is no multiple of 128, m = 2 and gamma = 0.5 give entries over several key tiles.
    qkv = random_qkv(6, 1, 200, 2, 1, 128, jnp.bfloat16)
    dga_kwargs = dict(group_size=2, focal_ratio=0.5)
    default = backends.check_kernel("pallas_gpu", None, GPU_INTERPRET, *qkv)
    assert (default.block_q, default.block_k) == (128, 64)
    _check_against_xla(GPU, qkv, dga_kwargs, jnp.bfloat16)


def test_gpu_kernels_pad_the_head_dim():
    # D = 24 is padded to 32 for Triton; GQA with 3 query heads per KV head.
    qkv = random_qkv(4, 1, 70, 3, 1, 24)
    kwargs = dict(GPU, block_sizes=BlockSizes(16, 16, 16, 16))
    _check_against_xla(kwargs, qkv, dict(group_size=4, focal_ratio=0.1))


@pytest.mark.parametrize(
    "seq_len, m, lengths, dtype, tile",
    [
        # 150 sampled queries x 2 heads and 300 keys: 5 row tiles and 5 key tiles of 64.
        (300, 2, None, jnp.float32, (64, 64)),
        # m = 1 samples every position: right-padded rows end in row tiles of padding only.
        (200, 1, [200, 70, 1, 130], jnp.float32, (16, 32)),
        (250, 4, None, jnp.bfloat16, (32, 16)),
    ],
)
def test_gpu_kernels_importance_matches_xla(seq_len, m, lengths, dtype, tile):
    q, k, _ = random_qkv(5, 1 if lengths is None else len(lengths), seq_len, 4, 2, 24, dtype)
    lengths = None if lengths is None else jnp.asarray(lengths)
    importance = functools.partial(global_importance, q, k, m, 0.3, block=32, lengths=lengths)
    passes = pallas_gpu_importance.passes(
        GPU_INTERPRET, pallas_gpu_importance.ImportanceTile(*tile)
    )
    got = jax.block_until_ready(importance(passes=passes))
    assert_close(got, importance(), FORWARD_TOL[dtype])


def test_gpu_kernels_importance_zigzag_keys_and_poisoned_padding():
    # A device's keys under a zig-zag context split: two pieces of positions, [24, 69) and
    # [328, 373) of L = 400, so key tiles of 32 straddle the gap, and 6 padding keys end the
    # last tile. Sampled queries every 4 positions, then 10 padding rows (-1). The padding's
    # queries and keys hold NaN: neither pass may read them into a visible score.
    _, k, _ = random_qkv(6, 2, 90, 4, 2, 16)
    qs = jax.random.normal(jax.random.key(7), (2, 110, 4, 16)).at[:, 100:].set(jnp.nan)
    key_pos = jnp.concatenate([jnp.arange(24, 69), jnp.arange(328, 373)]).astype(jnp.int32)
    pos = jnp.concatenate([jnp.arange(0, 400, 4), jnp.full(10, -1)]).astype(jnp.int32)
    tiles = ImportanceTiles.build(qs, pos, k, 4, 0.3, 32, key_pos)
    tiles = dataclasses.replace(tiles, ks=tiles.ks.at[:, 90:].set(jnp.nan))  # the padded keys
    tile = pallas_gpu_importance.ImportanceTile(16, 32)
    kernels = pallas_gpu_importance.passes(GPU_INTERPRET, tile)
    want_max, want_total = XLA_PASSES.stats(tiles)
    got_max, got_total = kernels.stats(tiles)
    assert bool(jnp.all(jnp.isfinite(want_total))) and float(jnp.max(want_total)) > 0
    assert_close(got_max, want_max, FORWARD_TOL[jnp.float32])
    assert_close(got_total, want_total, FORWARD_TOL[jnp.float32])
    lse = jnp.where(want_total > 0, want_max + jnp.log(want_total), jnp.inf)
    got, want = kernels.scores(tiles, lse)[:, :90], XLA_PASSES.scores(tiles, lse)[:, :90]
    assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.min(got)) > 0
    assert_close(got, want, FORWARD_TOL[jnp.float32])


@pytest.mark.parametrize("rows, keys", [(48, 64), (64, 8)])
def test_importance_tiles_are_powers_of_two(rows, keys):
    field = "rows" if rows == 48 else "keys"
    with pytest.raises(ValueError, match=f"ImportanceTile.{field} must be a power of two"):
        pallas_gpu_importance.ImportanceTile(rows, keys)


@pytest.mark.parametrize(
    "selection, block_q, dtype",
    # L = 200 is a multiple of neither query block.
    [("global", 16, jnp.float32), ("streaming", 16, jnp.float32), ("global", 32, jnp.bfloat16)],
)
def test_tpu_kernels_many_blocks(selection, block_q, dtype):
    # m = 2, gamma = 0.3, L = 200: ~130 prefix and ~140 raw entries, two 128-entry blocks each.
    qkv = random_qkv(5, 1, 200, 2, 1, 8, dtype)
    kwargs = dict(TPU, block_sizes=BlockSizes(block_q, 128, 16, 32))
    dga_kwargs = dict(group_size=2, focal_ratio=0.3, selection=selection)
    _check_against_xla(kwargs, qkv, dga_kwargs, dtype)


def test_tpu_kernels_padded_row_longer_than_the_band_steps():
    # Padding positions are raw tokens visible from their position on: the last padding query
    # block sees entries 100..259, three 128-entry blocks, beyond the two band steps a DGA band
    # needs (block_q + band lag). That broke the static bound: the whole output was NaN.
    q, k, v = random_qkv(8, 1, 260, 1, 1, 8)
    lengths = jnp.array([100])
    dga_kwargs = dict(group_size=4, focal_ratio=0.0, lengths=lengths)
    kernel = functools.partial(
        dga_jax.dga_attention, **TPU, block_sizes=BlockSizes(16, 128), **dga_kwargs
    )
    xla = functools.partial(dga_jax.dga_attention, implementation="xla", **dga_kwargs)
    out = jax.block_until_ready(kernel(q, k, v))
    assert bool(jnp.all(jnp.isfinite(out)))
    assert_close(out[:, :100], xla(q, k, v)[:, :100], FORWARD_TOL[jnp.float32])


def _read_before_the_copy_lands(x_hbm, o_ref, buffer, semaphore):
    copy = pltpu.make_async_copy(x_hbm, buffer, semaphore)
    copy.start()
    o_ref[...] = buffer[...]  # races with the DMA still writing `buffer`
    copy.wait()


def test_the_race_detector_the_suite_relies_on_reports_races(capfd):
    # tests/conftest.py fails any other test on this report; here it must appear.
    x = jnp.ones((8, 128), jnp.float32)
    racy = pl.pallas_call(
        _read_before_the_copy_lands,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
        interpret=TPU_INTERPRET,
    )
    jax.block_until_ready(racy(x))
    assert RACE_REPORT in "".join(capfd.readouterr())


def _lowered(implementation: str, platform: str, block_sizes: BlockSizes) -> str:
    """StableHLO of forward + backward lowered for `platform` (no device needed)."""
    q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    attention = functools.partial(
        dga_jax.ops.dga.api._dga,
        config=DGAConfig(16, 0.1, "global"),
        scale=128**-0.5,
        implementation=implementation,
        block_sizes=block_sizes,
        interpret=False,
        split=WHOLE,
    )

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32))

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return grads.trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()


def test_gpu_kernels_lower_to_triton():
    text = _lowered("pallas_gpu", "cuda", BlockSizes(64, 64))
    # Importance's two passes, forward, dQ, dK/dV of the prefix and of the band: six Triton calls.
    assert text.count("custom_call @__gpu$xla.gpu.triton(") == 6


def _launches(text: str) -> dict[str, tuple[int, int]]:
    """Each Triton call's (num_warps, num_stages) in lowered text, by kernel name."""
    found = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    return {name: (int(warps), int(stages)) for name, stages, warps in found}


def test_gpu_kernels_launch_as_their_block_sizes_say():
    walks = {"interval_forward", "interval_dq", "interval_dkv_prefix", "interval_dkv_band"}
    importance = {"importance_stats", "importance_scores"}  # their own launch, never the walks'
    default = _launches(_lowered("pallas_gpu", "cuda", BlockSizes(64, 64)))
    assert default == dict.fromkeys(walks | importance, (8, 2))  # D = 128
    given = _launches(_lowered("pallas_gpu", "cuda", BlockSizes(64, 64, num_warps=2, num_stages=3)))
    assert given == {**dict.fromkeys(walks, (2, 3)), **dict.fromkeys(importance, (8, 2))}


@pytest.mark.parametrize("block_q", [128, 16])
def test_tpu_kernels_lower_to_mosaic(block_q):
    # block_q = 16 < L: the backward's [1, block_q] rows of lse and delta must still be blocks
    # Mosaic takes (whole in their array's last two axes, as block_q is not a multiple of 128).
    text = _lowered("pallas_tpu", "tpu", BlockSizes(block_q, 128))
    assert text.count("custom_call @tpu_custom_call(") == 4


@pytest.mark.parametrize(
    "implementation, block_sizes, field",
    [
        ("pallas_gpu", BlockSizes(48, 64), "block_q"),  # not a power of two
        ("pallas_gpu", BlockSizes(64, 8), "block_k"),  # below Triton's 16
        ("pallas_tpu", BlockSizes(24, 128), "block_q"),  # not whole bfloat16 sublane tiles
        ("pallas_tpu", BlockSizes(512, 64), "block_k"),  # not whole lanes
    ],
)
def test_bad_kernel_block_sizes(implementation, block_sizes, field):
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match=rf"{implementation}.*BlockSizes\.{field}"):
        dga_jax.dga_attention(
            q, k, v, implementation=implementation, block_sizes=block_sizes, interpret=True
        )


WRONG_BACKEND = ["pallas_tpu"] if ON_GPU else ["pallas_gpu", "pallas_tpu"]


@pytest.mark.parametrize("implementation", WRONG_BACKEND)
def test_kernel_on_the_wrong_backend_says_how_to_interpret(implementation):
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="interpret=True"):
        dga_jax.dga_attention(q, k, v, implementation=implementation)


def test_interpret_is_for_kernels_only():
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="interpret"):
        dga_jax.dga_attention(q, k, v, implementation="xla", interpret=True)


def _operands(selection: str, spec: common.KernelSpec):
    """Kernel operands of a random DGA layout with many blocks in both lists."""
    q, k, v = random_qkv(6, 2, 150, 4, 2, 8)
    layout = dga_layout(q, k, DGAConfig(3, 0.3, selection), 0.3)
    prefix, raw = gather_entries(layout, k, v)
    return common.prepare(q, prefix, raw, spec)


def _visible(start, until, t):
    """[N] entries x [T] positions -> visibility [T, N] (numpy)."""
    return (start[None, :] <= t[:, None]) & (t[:, None] < until[None, :])


@pytest.mark.parametrize("selection", ["global", "streaming"])
def test_block_ranges_cover_exactly_what_is_visible(selection):
    spec = common.KernelSpec(
        0.3, block_q=16, block_k=8, groups=2, seq_len=150, interpret=True, band_lag=2
    )
    ops = _operands(selection, spec)
    qb, kb = common.query_blocks(ops, spec), common.key_blocks(ops, spec)
    qb, kb = jax.tree.map(np.asarray, qb), jax.tree.map(np.asarray, kb)
    bq, bk, lp = spec.block_q, spec.block_k, ops.q.shape[2]
    t = np.arange(lp)
    for b, h in np.ndindex(*ops.prefix_start.shape[:2]):
        p_start = np.asarray(ops.prefix_start[b, h])
        p_vis = _visible(p_start, np.full_like(p_start, NEVER), t)  # [Lp, NP]
        r_vis = _visible(np.asarray(ops.band_start[b, h]), np.asarray(ops.band_until[b, h]), t)
        # Query-stationary walk: visited blocks hold every visible entry; unmasked ones are whole.
        for i in range(lp // bq):
            rows = slice(i * bq, (i + 1) * bq)
            p_seen = np.flatnonzero(p_vis[rows].any(axis=0))
            full, n_prefix = qb.full[b, h, i], qb.prefix_blocks[b, h, i]
            assert np.all(p_seen // bk < n_prefix)
            assert p_vis[rows, : full * bk].all()
            r_seen = np.flatnonzero(r_vis[rows].any(axis=0))
            first, count = qb.band_first[b, h, i], qb.band_blocks[b, h, i]
            assert np.all((r_seen // bk >= first) & (r_seen // bk < first + count))
        # Key-stationary walk: the same pairs, seen from the entry blocks.
        for j in range(p_start.size // bk):
            cols = slice(j * bk, (j + 1) * bk)
            q_seen = np.flatnonzero(p_vis[:, cols].any(axis=1)) // bq
            assert np.all(q_seen >= kb.prefix_first[b, h, j])
            whole = p_vis[kb.prefix_full[b, h, j] * bq :, cols]
            assert whole.all()
        for j in range(r_vis.shape[1] // bk):
            q_seen = np.flatnonzero(r_vis[:, j * bk : (j + 1) * bk].any(axis=1)) // bq
            assert np.all((q_seen >= kb.band_first[b, h, j]) & (q_seen < kb.band_end[b, h, j]))


def test_step_list_enumerates_each_pair_once():
    first = jnp.array([0, 2, 5, 5, 9], jnp.int32)
    end = jnp.array([3, 2, 9, 7, 9], jnp.int32)  # blocks 1 and 4 are seen by nobody
    block, packed, fits = jax.tree.map(np.asarray, step_list(first, end, 16))
    query, flags = packed >> 3, packed & 7
    assert fits
    computed = [(j, i) for j, i, f in zip(block, query, flags, strict=True) if f & 1]
    assert computed == [(j, i) for j in range(5) for i in range(first[j], end[j])]
    # Every block is opened and closed exactly once, nobody-seen blocks included.
    assert sorted(block[(flags & 2) != 0].tolist()) == list(range(5))
    assert sorted(block[(flags & 4) != 0].tolist()) == list(range(5))


def test_step_list_reports_when_steps_run_out():
    first = jnp.array([0, 0], jnp.int32)
    end = jnp.array([4, 4], jnp.int32)
    *_, fits = step_list(first, end, 7)
    assert not bool(fits)


def test_interpret_params_are_for_the_tpu_kernels():
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="must be a bool"):
        dga_jax.dga_attention(q, k, v, implementation="pallas_gpu", interpret=TPU_INTERPRET)


# Under jax_enable_x64, set as JAX asks (before it starts: toggling it inside the test process
# changes what later compiles see), in a process of its own.
X64_SCRIPT = """
import jax, jax.numpy as jnp
import dga_jax
from dga_jax import BlockSizes
from tests.conftest import FORWARD_TOL, GPU_INTERPRET, TPU_INTERPRET, assert_close, random_qkv
assert jax.config.jax_enable_x64
# The grid's KV head index divided int32 by an int64 constant: a TypeError ("lax.div requires
# arguments to have the same dtypes") deep in pallas_call, for float32 inputs too.
q, k, v = random_qkv(9, 2, 20, 2, 1, 8)
kwargs = dict(group_size=4, lengths=jnp.array([20, 9]))
tpu = dict(implementation="pallas_tpu", interpret=TPU_INTERPRET, block_sizes=BlockSizes(16, 128))
got = dga_jax.dga_attention(q, k, v, **tpu, **kwargs)
want = dga_jax.dga_attention(q, k, v, implementation="xla", **kwargs)
assert got.dtype == jnp.float32
assert_close(got[:1], want[:1], FORWARD_TOL[jnp.float32])
assert_close(got[1, :9], want[1, :9], FORWARD_TOL[jnp.float32])
# float64 failed deep in tracing: a while_loop carry of float32 vs float64 on GPU, "64-bit
# types are not supported" in Mosaic.
q, k, v = (x.astype(jnp.float64) for x in random_qkv(0, 1, 16, 2, 1, 8))
for implementation, interpret in (("pallas_gpu", GPU_INTERPRET), ("pallas_tpu", TPU_INTERPRET)):
    try:
        dga_jax.dga_attention(q, k, v, implementation=implementation, interpret=interpret)
    except ValueError as error:
        assert "float32, bfloat16, float16, got float64" in str(error), error
        assert "use implementation='xla'" in str(error), error
    else:
        raise AssertionError(f"{implementation} took float64")
print("x64 ok")
"""


def test_the_kernels_under_x64():
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", X64_SCRIPT],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "x64 ok" in result.stdout, result.stderr[-3000:]
