"""Input validation of the public entry points, and the static sizes a DGA config implies.

Every bad input raises `ValueError` at call time, naming the argument at fault (and the shapes,
where shapes are the problem), on both `dga_attention` and `dense_attention`.
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax import BlockSizes
from dga_jax.ops.context import ContextSplit
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import dga_layout
from tests.conftest import FORWARD_TOL, assert_close, random_qkv

ENTRY_POINTS = {"dga": dga_jax.dga_attention, "dense": dga_jax.dense_attention}
Q, KV = (2, 16, 4, 8), (2, 16, 2, 8)


def shapes(q=Q, k=KV, v=None):
    """A regex for the shapes in a message: `q (2, 16, 4, 8)`, then k, then v (where given)."""
    named = [("q", q), ("k", k)] + ([] if v is None else [("v", v)])
    return ".*".join(re.escape(f"{name} {shape}") for name, shape in named)


def zeros(q=Q, k=KV, v=None, dtypes=(jnp.float32,) * 3):
    v = k if v is None else v
    return tuple(jnp.zeros(s, dtype) for s, dtype in zip((q, k, v), dtypes, strict=True))


# id: (q, k, v shapes (v defaults to k's), the regex the message must match)
SHAPE_CASES = {
    "q-rank3": (dict(q=(2, 16, 8)), r"\bq\b.*rank.*" + re.escape("(2, 16, 8)")),
    "k-rank5": (
        dict(k=(2, 16, 2, 8, 1)),
        r"\bk\b.*rank.*" + re.escape("(2, 16, 2, 8, 1)"),
    ),
    "v-rank3": (dict(v=(2, 16, 8)), r"\bv\b.*rank.*" + re.escape("(2, 16, 8)")),
    "batch": (dict(k=(3, 16, 2, 8)), r"\bB\b.*" + shapes(k=(3, 16, 2, 8))),
    "length": (dict(k=(2, 12, 2, 8)), r"\bL\b.*" + shapes(k=(2, 12, 2, 8))),
    "head_dim": (dict(k=(2, 16, 2, 4)), r"\bD\b.*" + shapes(k=(2, 16, 2, 4))),
    "k-v-differ": (
        dict(v=(2, 16, 2, 4)),
        r"\bk\b.*\bv\b.*" + shapes(v=(2, 16, 2, 4)),
    ),
    "heads-3-over-2": (
        dict(q=(2, 16, 3, 8)),
        r"\bHq\b.*\bHkv\b.*" + shapes(q=(2, 16, 3, 8)),
    ),
    "no-kv-heads": (
        dict(k=(2, 16, 0, 8)),
        r"\bHkv\b.*" + shapes(k=(2, 16, 0, 8)),
    ),
    "empty-sequence": (
        dict(q=(2, 0, 4, 8), k=(2, 0, 2, 8)),
        r"\bL\b.*" + shapes(q=(2, 0, 4, 8), k=(2, 0, 2, 8)),
    ),
    "empty-batch": (
        dict(q=(0, 16, 4, 8), k=(0, 16, 2, 8)),
        r"\bB\b.*>= 1.*" + shapes(q=(0, 16, 4, 8), k=(0, 16, 2, 8)),
    ),
    "no-query-heads": (dict(q=(2, 16, 0, 8)), r"\bHq\b.*>= 1.*" + shapes(q=(2, 16, 0, 8))),
    "head_dim-0": (
        dict(q=(2, 16, 4, 0), k=(2, 16, 2, 0)),
        r"\bD\b.*>= 1.*" + shapes(q=(2, 16, 4, 0), k=(2, 16, 2, 0)),
    ),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_bad_shapes(entry, case):
    kwargs, pattern = SHAPE_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[entry](*zeros(**kwargs))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("position, name", list(enumerate("qkv")), ids=list("qkv"))
def test_non_floating_inputs(entry, position, name):
    dtypes = [jnp.float32] * 3
    dtypes[position] = jnp.int32
    with pytest.raises(ValueError, match=rf"\b{name}\b.*floating.*int32"):
        ENTRY_POINTS[entry](*zeros(dtypes=tuple(dtypes)))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    "scale", [0, 0.0, -0.5, math.inf, math.nan, "0.1"], ids=["0", "0.0", "neg", "inf", "nan", "str"]
)
def test_bad_scale(entry, scale):
    with pytest.raises(ValueError, match=rf"\bscale\b.*{re.escape(repr(scale))}"):
        ENTRY_POINTS[entry](*zeros(), scale=scale)


# id: (keyword arguments of dga_attention, the argument the message must name)
DGA_CASES = {
    "group_size=0": (dict(group_size=0), "group_size"),
    "group_size=-1": (dict(group_size=-1), "group_size"),
    "group_size=2.5": (dict(group_size=2.5), "group_size"),
    "group_size=True": (dict(group_size=True), "group_size"),
    "focal_ratio=-0.1": (dict(focal_ratio=-0.1), "focal_ratio"),
    "focal_ratio=1.5": (dict(focal_ratio=1.5), "focal_ratio"),
    "focal_ratio=str": (dict(focal_ratio="0.1"), "focal_ratio"),
    "focal_ratio=nan": (dict(focal_ratio=math.nan), "focal_ratio"),
    "selection=local": (dict(selection="local"), "selection"),
    "implementation=pallas_tpu": (dict(implementation="pallas_tpu"), "implementation"),
    "implementation=foo": (dict(implementation="foo"), "implementation"),
}


@pytest.mark.parametrize("case", DGA_CASES)
def test_bad_dga_arguments(case):
    kwargs, name = DGA_CASES[case]
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=rf"\b{name}\b.*{re.escape(repr(value))}"):
        dga_jax.dga_attention(*zeros(), **kwargs)


def test_a_dga_config_equals_its_fields_and_excludes_them():
    q, k, v = random_qkv(0, 1, 48, 4, 2, 8)
    config = DGAConfig(group_size=4, focal_ratio=0.25, selection="streaming")
    by_config = dga_jax.dga_attention(q, k, v, config)
    by_fields = dga_jax.dga_attention(
        q, k, v, group_size=4, focal_ratio=0.25, selection="streaming"
    )
    np.testing.assert_array_equal(np.asarray(by_config), np.asarray(by_fields))
    assert not np.array_equal(np.asarray(by_config), np.asarray(dga_jax.dga_attention(q, k, v)))
    with pytest.raises(ValueError, match="either config= or focal_ratio, group_size, not both"):
        dga_jax.dga_attention(q, k, v, config, group_size=4, focal_ratio=0.25)
    with pytest.raises(TypeError, match="config must be a DGAConfig, got dict"):
        dga_jax.dga_attention(q, k, v, {"group_size": 4})


@pytest.mark.parametrize("lengths", [None, [48, 30]])
def test_a_given_layout_replaces_selection_and_is_checked(lengths):
    q, k, v = random_qkv(0, 2, 48, 4, 2, 8)
    config, scale = DGAConfig(group_size=4, focal_ratio=0.25), 8**-0.5
    layout = dga_layout(q, k, config, scale, lengths=lengths)
    own = dga_jax.dga_attention(q, k, v, config, lengths=lengths)
    given = dga_jax.dga_attention(q, k, v, config, layout=layout)  # it holds the lengths
    assert_close(given, own, FORWARD_TOL[jnp.float32])
    # the layout decides: another sequence's changes the outputs
    q2, k2, _ = random_qkv(1, 2, 48, 4, 2, 8)
    other = dga_jax.dga_attention(
        q, k, v, config, layout=dga_layout(q2, k2, config, scale, lengths=lengths)
    )
    assert float(jnp.abs(other - own).max()) > 1e-3
    # the reference selects by itself: it would ignore a layout (and the lengths it holds)
    with pytest.raises(ValueError, match=r"layout= is not supported with .*'reference'"):
        dga_jax.dga_attention(q, k, v, config, implementation="reference", layout=layout)
    # lengths and a layout could contradict each other: the layout holds them already
    with pytest.raises(ValueError, match="either lengths= or layout=, not both"):
        dga_jax.dga_attention(q, k, v, config, lengths=[48, 48], layout=layout)
    shape = r"layout is for \[B, Hkv, L\] = \[2, 2, 48\].*need \[2, 2, 40\]"
    with pytest.raises(ValueError, match=shape):
        dga_jax.dga_attention(q[:, :40], k[:, :40], v[:, :40], config, layout=layout)
    with pytest.raises(ValueError, match=r"layout is for .*group_size=4.*group_size=8"):
        dga_jax.dga_attention(q, k, v, DGAConfig(8, 0.25), layout=layout)
    with pytest.raises(TypeError, match="layout must be a DGALayout"):
        dga_jax.dga_attention(q, k, v, config, layout={"focal": layout.focal})


@pytest.mark.parametrize("implementation", ["foo", "pallas_tpu", ""])
def test_bad_dense_implementation(implementation):
    with pytest.raises(ValueError, match=rf"\bimplementation\b.*{re.escape(repr(implementation))}"):
        dga_jax.dense_attention(*zeros(), implementation=implementation)


@pytest.mark.parametrize(
    "block_q, block_k, name",
    [(0, 8, "block_q"), (8, -1, "block_k"), (8.0, 8, "block_q"), (8, True, "block_k")],
    ids=["block_q=0", "block_k=-1", "block_q=8.0", "block_k=True"],
)
def test_bad_block_sizes(block_q, block_k, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        BlockSizes(block_q, block_k)


@pytest.mark.parametrize(
    "launch, message",
    [
        (dict(num_warps=3), r"num_warps must be a power of two <= 32 \(a GPU block's .*got 3"),
        (dict(num_warps=64), r"num_warps must be a power of two <= 32 .*got 64"),
        (dict(num_warps=True), "num_warps must be a positive int, got True"),
        (dict(num_stages=0), "num_stages must be a positive int, got 0"),
    ],
)
def test_bad_launch(launch, message):
    with pytest.raises(ValueError, match=f"BlockSizes.{message}"):
        BlockSizes(**launch)


def test_a_launch_is_for_the_triton_kernels_only():
    q, k, v = random_qkv(0, 1, 16, 2, 2, 8)
    blocks = BlockSizes(16, 16, num_warps=2, num_stages=3)
    gpu = dict(implementation="pallas_gpu", interpret=True)
    # In interpret mode the launch changes nothing: the same numbers.
    got = dga_jax.dga_attention(q, k, v, **gpu, block_sizes=blocks)
    want = dga_jax.dga_attention(q, k, v, **gpu, block_sizes=BlockSizes(16, 16))
    np.testing.assert_array_equal(got, want)
    refused = [
        functools.partial(dga_jax.dga_attention, implementation="xla"),
        functools.partial(dga_jax.dga_attention, implementation="pallas_tpu", interpret=True),
        functools.partial(dga_jax.dense_attention, implementation="blockwise"),
    ]
    for attention in refused:
        with pytest.raises(ValueError, match=r"num_warps, num_stages .*implementation='\w+' takes"):
            attention(q, k, v, block_sizes=blocks)


# The spec's sizes, in exact arithmetic: float noise (0.1 * 30 = 3.0000000000000004) adds no token.


def spec_sizes(seq_len: int, m: int, gamma: Fraction, selection: str) -> dict:
    """num_focal, num_groups and chunk (m' for streaming, else 0) by the spec's rules."""
    if gamma == 1:  # every token focal, in both rules
        return dict(num_focal=seq_len, num_groups=0, chunk=0)
    if selection == "global":
        r = math.ceil(gamma * seq_len)
        return dict(num_focal=r, num_groups=(seq_len - r) // m, chunk=0)
    r_chunk = math.ceil(gamma * m / (1 - gamma))
    chunk = m + r_chunk
    return dict(num_focal=(seq_len // chunk) * r_chunk, num_groups=seq_len // chunk, chunk=chunk)


def test_spec_sizes_is_exact():
    # The oracle itself, on the spec's worked examples where float arithmetic rounds up wrongly.
    assert spec_sizes(30, 16, Fraction("0.1"), "global")["num_focal"] == 3
    assert spec_sizes(36, 16, Fraction("0.1"), "streaming")["chunk"] == 18
    assert spec_sizes(36, 16, Fraction("0.1"), "streaming")["num_focal"] == 4


@pytest.mark.parametrize("selection", ["global", "streaming"])
@pytest.mark.parametrize("gamma", ["0", "0.1", "0.25", "0.5", "0.9", "1"])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("seq_len", [1, 5, 16, 30, 100, 1000])
def test_config_sizes_match_spec(seq_len, m, gamma, selection):
    sizes = DGAConfig(m, float(gamma), selection).sizes(seq_len)
    expected = spec_sizes(seq_len, m, Fraction(gamma), selection)
    actual = dict(num_focal=sizes.num_focal, num_groups=sizes.num_groups, chunk=sizes.chunk)
    assert actual == expected
    assert (sizes.seq_len, sizes.group_size) == (seq_len, m)
    assert sizes.num_raw == seq_len - expected["num_focal"]
    assert sizes.num_prefix == expected["num_focal"] + expected["num_groups"]


def test_mixed_dtypes_are_rejected():
    q, k, v = random_qkv(0, 1, 16, 2, 2, 8)
    k16 = k.astype(jnp.bfloat16)
    for fn in (dga_jax.dga_attention, dga_jax.dense_attention):
        with pytest.raises(ValueError, match=r"dtype.*q float32, k bfloat16"):
            fn(q, k16, v.astype(jnp.bfloat16))


def test_block_sizes_must_be_block_sizes():
    q, k, v = random_qkv(0, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="block_sizes must be a dga_jax.BlockSizes"):
        dga_jax.dga_attention(q, k, v, block_sizes=(8, 8))
    with pytest.raises(ValueError, match="block_sizes must be a dga_jax.BlockSizes"):
        dga_jax.dense_attention(q, k, v, implementation="blockwise", block_sizes=(8, 8))


def test_block_sizes_for_the_reference_are_refused():
    # They were ignored: the reference has no tiles, so a caller's tiles changed nothing.
    q, k, v = random_qkv(0, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="implementation='reference' has none"):
        dga_jax.dga_attention(q, k, v, implementation="reference", block_sizes=BlockSizes(8, 8))


def test_bools_are_not_numbers():
    q, k, v = random_qkv(0, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="scale"):
        dga_jax.dga_attention(q, k, v, scale=True)
    with pytest.raises(ValueError, match="focal_ratio"):
        dga_jax.dga_attention(q, k, v, focal_ratio=True)


def test_numpy_scalars_are_accepted():
    q, k, v = random_qkv(0, 1, 40, 2, 2, 8)
    out = dga_jax.dga_attention(
        q, k, v, group_size=np.int64(4), focal_ratio=np.float32(0.25), scale=np.float32(0.5)
    )
    expected = dga_jax.dga_attention(q, k, v, group_size=4, focal_ratio=0.25, scale=0.5)
    np.testing.assert_array_equal(out, expected)
    assert DGAConfig(np.int64(4), np.float32(0.5)) == DGAConfig(4, 0.5)


@pytest.mark.parametrize("lengths", [[16, 17], [16, 0], [-3, 16]], ids=["above-L", "0", "negative"])
def test_concrete_lengths_outside_1_to_L_are_refused(lengths):
    q, k, v = random_qkv(0, 2, 16, 4, 2, 8)
    bad = [n for n in lengths if not 1 <= n <= 16]
    with pytest.raises(ValueError, match=re.escape("lengths must lie in [1, L] = [1, 16]; rows")):
        dga_jax.dga_attention(q, k, v, group_size=4, focal_ratio=0.25, lengths=jnp.array(lengths))
    with pytest.raises(ValueError, match=re.escape(f"have {bad}")):
        dga_jax.dga_attention(q, k, v, group_size=4, focal_ratio=0.25, lengths=lengths)


def test_traced_lengths_are_clipped_to_L():
    q, k, v = random_qkv(0, 2, 16, 4, 2, 8)
    config = DGAConfig(4, 0.25)
    full = dga_jax.dga_attention(q, k, v, config)
    traced = jax.jit(functools.partial(dga_jax.dga_attention, q, k, v, config))
    np.testing.assert_array_equal(np.asarray(traced(lengths=jnp.array([16, 40]))), full)


@pytest.mark.parametrize("seq_len", [1000, 10_000])
def test_a_float32_focal_ratio_counts_as_its_decimal(seq_len):
    # np.float32(0.1) is 0.10000000149: without normalising, ceil(gamma L) gains a token.
    config = DGAConfig(16, np.float32(0.1))
    assert config == DGAConfig(16, 0.1)
    assert config.sizes(seq_len) == DGAConfig(16, 0.1).sizes(seq_len)
    assert config.sizes(seq_len).num_focal == seq_len // 10


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(group_size=0), r"^dga\.group_size must be an int >= 1, got 0$"),
        (dict(focal_ratio=2.0), r"^dga\.focal_ratio must be a number in \[0, 1\], got 2\.0$"),
        (dict(selection="local"), r"^dga\.selection must be one of .*, got 'local'$"),
        # chunks of m' = 1.6e11 tokens: an OverflowError deep in a jitted call, or a decode tail
        # of 40 TB
        (dict(focal_ratio=1 - 1e-10), r"^dga\.group_size=16 with .* chunks of 159999986762 "),
        (dict(group_size=2**31, focal_ratio=1.0), r"groups or chunks of 2147483648 tokens"),
    ],
)
def test_dga_config_errors_name_the_field_path(fields, match):
    with pytest.raises(ValueError, match=match):
        DGAConfig(**fields)


def test_a_split_must_match_its_mesh_axis():
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    attention = functools.partial(dga_jax.dga_attention, group_size=4, split=ContextSplit("seq", 2))
    with pytest.raises(ValueError, match="not bound: call dga_attention inside a jax.shard_map"):
        attention(q, k, v)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec(None, "seq")
    sharded = jax.shard_map(attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    with pytest.raises(ValueError, match=r"says 2 parts, but mesh axes 'seq' hold 1 devices"):
        jax.jit(sharded)(q, k, v)


@pytest.mark.parametrize("shards", [2.0, None, True], ids=["float", "None", "bool"])
def test_a_split_needs_an_int_part_count(shards):
    # A float count passed every check and failed inside the sampled-query gather (IndexError).
    with pytest.raises(ValueError, match=rf"shards must be an int >= 1, got {shards!r}"):
        ContextSplit("seq", shards)


@pytest.mark.parametrize("parts", [0, -1, 2.0], ids=["0", "negative", "float"])
def test_zigzag_order_needs_an_int_part_count(parts):
    with pytest.raises(ValueError, match=rf"parts \(devices\) as an int >= 1, got {parts!r}"):
        dga_jax.zigzag_order(8, parts)
