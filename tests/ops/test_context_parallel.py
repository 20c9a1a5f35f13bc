"""Context parallelism: attention over a sequence split across devices equals one device.

`per_shard` with the sequence split over the `seq` mesh axis, each strategy ("ulysses", "dga"),
against single-device `dga_attention` / `dense_attention`: outputs, gradients and DGA's layout
(focal set and groups, exactly), then what the compiled program holds (memory per device,
collectives). The scripts run in subprocesses on 8 fake CPU devices (the flag must be set
before JAX starts); each prints "ok" last.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax.ops.context import ContextSplit, zigzag_order
from dga_jax.ops.dga.sharded import choose_strategy, per_shard
from tests.conftest import random_qkv, run_on_fake_devices

PRELUDE = """
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import dga_jax
from dga_jax import BlockSizes
from dga_jax.ops.context import ContextSplit, zigzag_order
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.dga.sharded import per_shard
from dga_jax.sharding import make_mesh
from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

assert jax.device_count() == 8
F32 = jnp.float32


def split(attention, strategy, zigzag=False):
    def sharded(q, k, v):
        return per_shard(
            lambda q, k, v, split: attention(q, k, v, split=split),
            q, k, v, batch=("data", "fsdp"), seq="seq", heads="tensor", strategy=strategy,
            zigzag=zigzag,
        )
    return sharded


def value_and_grads(fn, q, k, v, order=None):
    ct = jnp.cos(jnp.arange(q.size, dtype=F32)).reshape(q.shape)
    ct = ct if order is None else ct[:, order]
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * ct), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# Values and gradients under the mesh equal one device's; in zig-zag order the rows are
# permuted on the way in and back on the way out, as the data path does.
def check(attention, q, k, v, mesh, strategy, what, zigzag=False):
    expected = value_and_grads(attention, q, k, v)
    order = zigzag_order(q.shape[1], mesh[2]) if zigzag else np.arange(q.shape[1])
    with jax.set_mesh(make_mesh(mesh)):
        got = value_and_grads(
            split(attention, strategy, zigzag), *(x[:, order] for x in (q, k, v)), order
        )
    back = np.argsort(order)
    assert_close(got[0][:, back], expected[0], FORWARD_TOL[F32])
    for a, b in zip(got[1], expected[1], strict=True):
        assert_close(a[:, back], b, GRAD_TOL[F32])
    print("equal:", what, mesh, strategy, "zigzag" if zigzag else "", flush=True)
"""

GRID = PRELUDE + textwrap.dedent(
    """
    # "dga": each selection with gamma in {0, 0.1, 0.5, 1} and m in {1, 4, 16}, GQA, B = 2;
    # L / P = 8 is not a multiple of m' (5 for m = 4, 18 for m = 16), groups of 16 span 3+
    # devices. (Selection, gamma, m) pairs cover each value of one with each of the others.
    q, k, v = random_qkv(0, 2, 64, 4, 2, 8)
    for selection, gamma, m in (
        ("global", 0.0, 4), ("global", 0.1, 1), ("global", 0.5, 16), ("global", 1.0, 16),
        ("streaming", 0.0, 16), ("streaming", 0.1, 16), ("streaming", 0.5, 4),
        ("streaming", 0.1, 1),
    ):
        attention = functools.partial(
            dga_jax.dga_attention, group_size=m, focal_ratio=gamma, selection=selection
        )
        check(attention, q, k, v, (1, 1, 8, 1), "dga", (selection, gamma, m))
    print("ok")
    """
)


EQUALITY = PRELUDE + textwrap.dedent(
    """
    q, k, v = random_qkv(0, 2, 64, 4, 2, 8)
    # One part naming an axis that splits the sequence would attend to each piece alone.
    two = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2],
                        axis_types=(jax.sharding.AxisType.Auto,))
    whole = functools.partial(dga_jax.dga_attention, split=ContextSplit("seq", 1))
    sharded = jax.shard_map(whole, mesh=two, in_specs=(P(None, "seq"),) * 3,
                            out_specs=P(None, "seq"), check_vma=False)
    try:
        jax.jit(sharded)(q, k, v)
        raise AssertionError("ContextSplit('seq', 1) over 2 devices ran")
    except ValueError as error:
        assert "says 1 parts, but mesh axes 'seq' hold 2 devices" in str(error), error
    # Other meshes: batch, sequence and heads split at once.
    for mesh in ((1, 1, 4, 2), (2, 1, 2, 2)):
        for selection in ("global", "streaming"):
            attention = functools.partial(
                dga_jax.dga_attention, group_size=4, focal_ratio=0.2, selection=selection
            )
            check(attention, q, k, v, mesh, "dga", selection)
    # A layout given, as prefill passes it: right-padded rows under the "dga" split (the
    # layout holds their lengths), equal to one device at every valid position.
    lengths, config = [64, 41], DGAConfig(4, 0.25)
    layout = dga_layout(q, k, config, 8**-0.5, lengths=jnp.asarray(lengths))
    want = dga_jax.dga_attention(q, k, v, config, lengths=jnp.asarray(lengths))

    def given(q, k, v, layout, *, split):
        return dga_jax.dga_attention(q, k, v, config, split=split, layout=layout)

    def sharded(q, k, v, layout):
        axes = dict(batch=("data", "fsdp"), seq="seq", heads="tensor")
        return per_shard(given, q, k, v, strategy="dga", layout=layout, **axes)

    for mesh in ((1, 1, 8, 1), (2, 1, 2, 2)):
        with jax.set_mesh(make_mesh(mesh)):
            got = jax.jit(sharded)(q, k, v, layout)
        for b, n in enumerate(lengths):
            assert_close(got[b, :n], want[b, :n], FORWARD_TOL[F32])
        print("equal: a given padded layout", mesh, flush=True)
    # "ulysses": 8 KV heads, so every mesh's tensor shard holds a multiple of the seq parts.
    # The attention inside is unchanged: one selection per mesh.
    q8, k8, v8 = random_qkv(1, 2, 32, 16, 8, 8)
    for mesh, selection in (((1, 1, 8, 1), "global"), ((1, 1, 4, 2), "streaming"),
                            ((2, 1, 2, 2), "global")):
        attention = functools.partial(
            dga_jax.dga_attention, group_size=4, focal_ratio=0.1, selection=selection
        )
        check(attention, q8, k8, v8, mesh, "ulysses", selection)
    dense = dga_jax.dense_attention
    check(dense, q8, k8, v8, (2, 1, 2, 2), "ulysses", "dense")
    blockwise = functools.partial(dense, implementation="blockwise")
    check(blockwise, q, k, v, (1, 1, 4, 2), "dga", "dense")
    # Zig-zag order: each device holds an early and a late piece (of 4 positions at P = 8);
    # each selection with groups inside a piece (m = 4) and across pieces (m = 16).
    for selection, m, gamma, mesh in (
        ("global", 4, 0.2, (1, 1, 8, 1)), ("global", 16, 0.5, (1, 1, 4, 2)),
        ("streaming", 4, 0.2, (1, 1, 4, 2)), ("streaming", 16, 0.5, (1, 1, 8, 1)),
    ):
        attention = functools.partial(
            dga_jax.dga_attention, group_size=m, focal_ratio=gamma, selection=selection
        )
        check(attention, q, k, v, mesh, "dga", (selection, m, gamma), zigzag=True)
    attention = functools.partial(dga_jax.dga_attention, group_size=4, selection="streaming")
    check(attention, q8, k8, v8, (2, 1, 2, 2), "ulysses", "streaming", zigzag=True)
    check(blockwise, q, k, v, (1, 1, 8, 1), "dga", "dense", zigzag=True)
    check(dense, q8, k8, v8, (1, 1, 8, 1), "ulysses", "dense", zigzag=True)
    # A sliding window (Mistral's) over the gathered keys: wider than a device's 8 (or 4 + 4
    # zig-zag) positions, so each device's queries reach into other devices' keys.
    windowed = functools.partial(blockwise, window=11)
    check(windowed, q, k, v, (1, 1, 8, 1), "dga", "dense window", zigzag=True)
    check(windowed, q, k, v, (1, 1, 4, 2), "dga", "dense window")
    print("ok")
    """
)


KERNELS = PRELUDE + textwrap.dedent(
    """
    # The Pallas kernels (interpreted) through the same boundary: entries relative to the
    # device's first position, query blocks of 16 so each device walks several.
    q, k, v = random_qkv(2, 1, 128, 4, 2, 16)
    blocks = {"pallas_gpu": BlockSizes(16, 16), "pallas_tpu": BlockSizes(16, 128)}
    for implementation, selection in (("pallas_gpu", "global"), ("pallas_tpu", "streaming")):
        attention = functools.partial(
            dga_jax.dga_attention, group_size=4, focal_ratio=0.2, selection=selection,
            implementation=implementation, interpret=True, block_sizes=blocks[implementation],
        )
        check(attention, q, k, v, (1, 1, 4, 2), "dga", implementation)
        check(attention, q, k, v, (1, 1, 2, 2), "dga", implementation, zigzag=True)
    # In a user's jax.shard_map that checks types (check_vma, its default): the kernels' outputs
    # must say how they vary ("manual_axis_type must not be None" otherwise). The batch and the
    # sequence split; pallas_gpu's interpreter (JAX's HLO one) cannot run there, its compile
    # for an H100 is tests/aot's.
    two = jax.make_mesh((2, 2), ("batch", "seq"), devices=jax.devices()[:4],
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
    tpu = functools.partial(
        dga_jax.dga_attention, group_size=4, focal_ratio=0.2, implementation="pallas_tpu",
        interpret=True, block_sizes=blocks["pallas_tpu"],
    )
    q, k, v = random_qkv(3, 2, 64, 4, 2, 16)
    checked = jax.shard_map(
        functools.partial(tpu, split=ContextSplit("seq", 2)), mesh=two,
        in_specs=(P("batch", "seq"),) * 3, out_specs=P("batch", "seq"),
    )
    got, expected = value_and_grads(checked, q, k, v), value_and_grads(tpu, q, k, v)
    assert_close(got[0], expected[0], FORWARD_TOL[F32])
    for a, b in zip(got[1], expected[1], strict=True):
        assert_close(a, b, GRAD_TOL[F32])
    print("ok")
    """
)


LAYOUT = PRELUDE + textwrap.dedent(
    """
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    FIELDS = ("focal", "prefix_src", "prefix_is_group", "prefix_from", "raw_pos", "raw_until")


    def layouts(q, k, config):
        whole = jax.jit(dga_layout, static_argnums=(2, 3))(q, k, config, 0.3)
        part = ContextSplit("seq", 8)
        fn = jax.shard_map(
            lambda q, k: dga_layout(q, k, config, 0.3, split=part),
            mesh=mesh, in_specs=(P(None, "seq"),) * 2, out_specs=P(), check_vma=False,
        )
        return whole, jax.jit(fn)(q, k)


    def same_layout(q, k, config, what):
        whole, part = layouts(q, k, config)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name), err_msg=name)
        assert_close(part.score, whole.score, FORWARD_TOL[F32])
        assert_close(part.group_weight, whole.group_weight, FORWARD_TOL[F32])
        print("same layout:", what, flush=True)
        return whole


    def spans(layout, chunk):  # devices each group's members lie on, per (batch, head)
        m, n = layout.sizes.group_size, layout.sizes.num_groups
        members = np.asarray(layout.raw_pos)[..., : n * m].reshape(*layout.raw_pos.shape[:2], n, m)
        return np.asarray([[[len(set(g // chunk)) for g in h] for h in b] for b in members])


    # Random inputs: a distributed log-sum-exp reassociates floats, so the rank-r score margin
    # must be clear of rounding for an exact focal set to be meaningful.
    q, k, v = random_qkv(3, 2, 128, 4, 2, 8)
    config = DGAConfig(16, 0.1, "global")
    whole = same_layout(q, k, config, "random")
    r = config.sizes(128).num_focal
    top = -np.sort(-np.asarray(whole.score), axis=-1)
    assert np.all(top[..., r - 1] - top[..., r] > 1e-4 * top[..., r - 1]), "margin at rank r"
    assert spans(whole, 16).max() >= 2

    # Focal tokens crowded onto the first devices (keys of device 1 align with every query):
    # device 1 wholly focal, devices 3 to 7 none; groups jump over device 1.
    u = jnp.ones((8,), F32)
    whole = same_layout(q + u, k.at[:, 16:32].add(2.0 * u), DGAConfig(4, 0.25), "crowded")
    focal = np.asarray(whole.focal)
    assert focal[..., 16:32].all() and not focal[..., 48:].any(), focal.sum(-1)

    # Groups spanning 3+ devices: m = 16 over devices of 8 positions with focal tokens between.
    q64, k64, _ = random_qkv(4, 1, 64, 4, 2, 8)
    whole = same_layout(q64, k64.at[:, 20:28].add(4.0 * u), DGAConfig(16, 0.3, "global"), "span")
    assert spans(whole, 8).max() >= 3, spans(whole, 8)

    # Exact ties across devices: zero keys tie every stretch of m positions (global), a zero
    # last query ties its whole chunk (streaming); ties go to the earlier position either way.
    zeros = jnp.zeros_like(k)
    same_layout(q, zeros, DGAConfig(12, 0.25, "global"), "global ties")
    same_layout(jnp.zeros_like(q), k, DGAConfig(4, 0.3, "streaming"), "streaming ties")
    same_layout(q, k, DGAConfig(4, 0.3, "streaming"), "streaming")

    # Streaming selection is causal across devices: changing the last device's tokens changes
    # no earlier output (up to summation order: a chunk re-decided by a later query may move a
    # visible token between the focal list and the raw band, as on one device).
    attention = functools.partial(dga_jax.dga_attention, group_size=4, focal_ratio=0.3,
                                  selection="streaming")
    with jax.set_mesh(make_mesh((1, 1, 8, 1))):
        fn = jax.jit(split(attention, "dga"))
        before = fn(q, k, v)
        after = fn(q, k.at[:, 112:].set(7.0), v.at[:, 112:].set(-7.0))
    assert_close(after[:, :112], before[:, :112], FORWARD_TOL[F32])
    assert not np.allclose(before[:, 112:], after[:, 112:])
    print("ok")
    """
)


COMPILED = textwrap.dedent(
    """
    import math

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dga_jax import Llama, ModelConfig
    from dga_jax.aot import lower_context_attention
    from dga_jax.compile_stats import collectives
    from dga_jax.sharding import make_mesh

    # Weights over the context group too: a (1, 1, 8, 1) mesh divides them by 8 (all but the
    # norms' few replicated scales).
    with jax.set_mesh(make_mesh((1, 1, 8, 1))):
        params = jax.tree.leaves(nnx.state(Llama(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))))
    local = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in params)
    assert local < 1.01 * sum(x.size for x in params) / 8, local

    # Attention fwd + bwd at L = 16K, long enough for the O(L) arrays to outweigh the tiles.
    L, HQ, HKV, D = 16384, 8, 4, 64
    shape = dict(seq_len=L, heads=HQ, kv_heads=HKV, head_dim=D, dtype=jnp.float32)
    for strategy, parts in (("dga", (1, 2, 4, 8)), ("ulysses", (1, 2, 4))):
        temps, flops = [], []
        for p in parts:
            compiled = lower_context_attention(
                jax.devices(), (1, 1, p, 1), strategy=strategy, **shape
            ).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes)
            flops.append(compiled.cost_analysis()["flops"])
            found = collectives(compiled)
            print(strategy, p, temps[-1] / 2**20, [(c.op, c.elements) for c in found], flush=True)
            if p == 1:
                continue
            if strategy == "dga":  # the full K or V never arrives anywhere
                assert max(c.elements for c in found) < L * HKV * D, found
            else:  # only all-to-alls of L / P-long blocks
                assert {c.op for c in found} == {"all-to-all"}, found
                assert max(c.elements for c in found) <= L // p * HQ * D, found
        assert all(a > b for a, b in zip(temps, temps[1:])), (strategy, temps)
        assert temps[-1] < temps[0] / 2, (strategy, temps)
        if strategy == "ulysses":  # each device does 1/P of the work
            assert all(0.9 < a / b / 2 < 1.1 for a, b in zip(flops, flops[1:])), flops
    print("ok")
    """
)


@pytest.mark.parametrize(
    "script",
    [GRID, EQUALITY, KERNELS, LAYOUT, COMPILED],
    ids=["grid", "equality", "kernels", "layout", "compiled"],
)
def test_context_parallel_on_eight_devices(script):
    run_on_fake_devices(script)


def test_without_a_mesh_it_is_a_plain_call():
    q, k, v = random_qkv(1, 1, 8, 2, 1, 4)
    calls = []

    def attention(q, k, v, split):
        calls.append((q.shape, split.shards))
        return q

    assert per_shard(attention, q, k, v, batch="data", seq="seq", heads="tensor") is q
    assert calls == [(q.shape, 1)]


def _identity(q, k, v, split):
    return q


@pytest.mark.parametrize(
    ("shape", "axes", "match"),
    [
        ((2, 8, 2, 1, 4), dict(heads="tensor"), "KV heads"),  # one KV head over 2 devices
        ((2, 8, 2, 2, 4), dict(batch="data"), "'data'"),  # not a mesh axis
    ],
)
def test_shapes_the_mesh_cannot_split_raise(shape, axes, match):
    q, k, v = random_qkv(1, *shape)
    abstract = jax.sharding.AbstractMesh((2,), ("tensor",))
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match=match):
        per_shard(_identity, q, k, v, **{"batch": None, "heads": None, **axes})


def test_strategy_choice_and_its_errors():
    abstract = jax.sharding.AbstractMesh((4, 2), ("seq", "tensor"))
    with jax.sharding.use_abstract_mesh(abstract):
        assert choose_strategy("auto", 8, 64, "seq") == "ulysses"
        assert choose_strategy("auto", 2, 64, "seq") == "dga"
        assert choose_strategy("dga", 8, 64, "seq") == "dga"
        with pytest.raises(ValueError, match=r"2 KV heads .* 'seq' of 4 devices.*'dga'"):
            choose_strategy("ulysses", 2, 64, "seq")
        with pytest.raises(ValueError, match=r"\(66 positions\) over mesh axes 'seq' of 4"):
            choose_strategy("dga", 8, 66, "seq")
    q, k, v = random_qkv(1, 1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="context_parallel must be one of"):
        per_shard(_identity, q, k, v, batch=None, heads=None, strategy="ring")


AUTO_RAN_DGA = (
    r"context_parallel='auto', which resolved to 'dga', splits them over mesh axes 'seq' of 4 "
    r"devices; use a mesh without a sequence split$"
)


@pytest.mark.parametrize(
    ("kv_heads", "strategy", "match"),
    [(2, "auto", AUTO_RAN_DGA), (4, "dga", r"'dga' splits .*; use context_parallel='ulysses'")],
)
def test_lengths_under_the_dga_strategy_name_the_strategy_that_ran(kv_heads, strategy, match):
    q, k, v = random_qkv(1, 1, 8, 4, kv_heads, 4)
    axes = dict(batch=None, heads=None, seq="seq")
    abstract = jax.sharding.AbstractMesh((4,), ("seq",))
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match=match):
        per_shard(_identity, q, k, v, strategy=strategy, lengths=jnp.array([5]), **axes)


def test_zigzag_order():
    order = zigzag_order(16, 4)  # pieces of 2: device p holds pieces p and 7 - p
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"\(20 positions\) into 2 x 4 pieces.*multiple of 8"):
        zigzag_order(20, 4)
    q, k, v = random_qkv(1, 1, 20, 2, 2, 4)
    abstract = jax.sharding.AbstractMesh((4,), ("seq",))
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match="zig-zag"):
        per_shard(_identity, q, k, v, batch=None, heads=None, seq="seq", zigzag=True)


def test_dense_split_must_match_its_mesh_axis():
    # A ContextSplit whose part count is not its axis size would attend to the wrong positions
    # (in zig-zag order), so dense attention refuses it, as DGA does.
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    attention = functools.partial(dga_jax.dense_attention, split=ContextSplit("seq", 2))
    with pytest.raises(ValueError, match="not bound: call dense_attention inside a jax.shard_map"):
        attention(q, k, v)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec(None, "seq")
    sharded = jax.shard_map(
        attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
    )
    with pytest.raises(ValueError, match=r"says 2 parts, but mesh axes 'seq' hold 1 devices"):
        jax.jit(sharded)(q, k, v)


def test_context_split_checks_its_fields():
    # A list of axes (PartitionSpec takes one) failed as a non-hashable static argument of jit.
    listed = ContextSplit(["data", "seq"], 4)
    assert listed.axis == ("data", "seq") and hash(listed) == hash(ContextSplit(("data", "seq"), 4))
    # A truthy string such as "contiguous" silently ran zig-zag order.
    with pytest.raises(ValueError, match="zigzag must be a bool, got 'contiguous'"):
        ContextSplit("seq", 2, "contiguous")
    for axis in (3, ("seq", "seq"), ("seq", 1)):
        with pytest.raises(ValueError, match=r"ContextSplit's axis must be None, a mesh axis"):
            ContextSplit(axis, 2)
    with pytest.raises(ValueError, match="shards > 1 parts needs a mesh axis"):
        ContextSplit((), 2)


@pytest.mark.parametrize(
    "op, kwargs",
    [("dense_attention", dict(implementation="blockwise")), ("dga_attention", {})],
)
def test_one_part_may_name_its_mesh_axis(op, kwargs):
    # ContextSplit(axis, mesh.shape[axis]) on a size-1 axis: the whole sequence (it was refused).
    q, k, v = random_qkv(0, 1, 16, 2, 1, 8)
    plain = functools.partial(getattr(dga_jax, op), **kwargs)
    attention = functools.partial(plain, split=ContextSplit("seq", 1))
    with pytest.raises(ValueError, match=f"not bound: call {op} inside a jax.shard_map"):
        attention(q, k, v)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec(None, "seq")
    sharded = jax.shard_map(
        attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
    )
    np.testing.assert_array_equal(jax.jit(sharded)(q, k, v), jax.jit(plain)(q, k, v))


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        (dict(batch="seq", seq="seq"), r"batch and seq both name mesh axis 'seq'"),
        (dict(seq="tensor", heads="tensor"), r"seq and heads both name mesh axis 'tensor'"),
        (dict(heads=("tensor", "tensor")), r"heads must be .* distinct names, got \('tensor', "),
        (dict(heads=2), r"per_shard's heads must be None, a mesh axis name .* got 2$"),
        (dict(seq="sq"), r"mesh axes \{'seq': \['sq'\]\} are not in the mesh"),
        (dict(zigzag="contiguous"), "zigzag must be a bool, got 'contiguous'"),
    ],
)
def test_per_shard_names_wrong_axes(axes, match):
    # Axes shared by two dimensions failed in JAX's PartitionSpec check (or, for the batch, as
    # a count of the wrong devices); a truthy zigzag string silently permuted the positions.
    q, k, v = random_qkv(1, 4, 16, 4, 4, 4)
    abstract = jax.sharding.AbstractMesh((4, 2), ("seq", "tensor"))
    given = {"batch": None, "seq": "seq", "heads": None, "strategy": "dga", **axes}
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match=match):
        per_shard(_identity, q, k, v, **given)


@pytest.mark.parametrize(
    ("shapes", "lengths", "match"),
    [
        (
            ((16, 4, 4), (1, 16, 2, 4)),
            None,
            r"q must have rank 4 \[B, L, H, D\], got shape .16, 4, 4.$",
        ),
        (((1, 16, 4, 4), (1, 8, 2, 4)), None, r"agree on length L .*q \(1, 16, 4, 4\), k \(1, 8,"),
        (((1, 16, 4, 4), (1, 16, 2, 4)), [3, 4], r"lengths must be integers of shape \(1,\)"),
    ],
)
def test_per_shard_names_the_whole_shapes(shapes, lengths, match):
    # Under a mesh these failed in with_sharding_constraint, or inside the attention with the
    # shapes of one device's slice.
    q, kv = (jnp.zeros(shape) for shape in shapes)
    abstract = jax.sharding.AbstractMesh((4,), ("seq",))
    axes = dict(batch=None, seq="seq", heads=None, strategy="dga")
    with jax.sharding.use_abstract_mesh(abstract), pytest.raises(ValueError, match=match):
        per_shard(_identity, q, kv, kv, lengths=lengths, **axes)


def test_per_shard_runs_outside_jit():
    # Arrays on one device, called eagerly under a mesh: with_sharding_constraint refused them.
    q, k, v = random_qkv(1, 1, 8, 2, 1, 4)
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        out = per_shard(dga_jax.dense_attention, q, k, v, batch=None, seq="seq", heads=None)
    np.testing.assert_array_equal(out, dga_jax.dense_attention(q, k, v))
