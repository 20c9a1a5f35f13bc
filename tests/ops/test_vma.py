"""Attention inside a user's own `jax.shard_map` that checks types (check_vma=True, the default),
and on arrays typed as sharded over Explicit mesh axes (JAX's sharding in types).

Models that shard_map themselves (batch or head parallel, the attention per shard) call
`dga_attention` and `dense_attention` on local slices: the loop carries of the XLA walk, of
selection and of MInference must vary over the mesh as the inputs do, and the custom VJPs'
cotangents must have their primals' types. Users of Explicit axes call them on sharded arrays
outside any shard_map. Values and gradients equal one device's. The script
runs in a subprocess on 4 fake CPU devices (the flag must be set before JAX starts) and prints
"ok" last.
"""

from __future__ import annotations

import textwrap

from tests.conftest import run_on_fake_devices

SCRIPT = textwrap.dedent(
    """
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import dga_jax
    from dga_jax.ops.context import ContextSplit
    from dga_jax.ops.sinks import StreamingLLMConfig, sink_attention
    from tests.conftest import FORWARD_TOL, GRAD_TOL, assert_close, random_qkv

    F32 = jnp.float32
    q, k, v = random_qkv(0, 2, 32, 4, 2, 8)


    def value_and_grads(fn, q, k, v):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.sin(out)), out
        (_, out), grads = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        )(q, k, v)
        return out, grads


    def check(what, whole, local, spec, mesh):
        # local(q, k, v) under jax.shard_map (check_vma=True) equals whole(q, k, v).
        want = value_and_grads(whole, q, k, v)
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        placed = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
        got = value_and_grads(sharded, *placed)
        assert_close(got[0], want[0], FORWARD_TOL[F32])
        for a, b in zip(got[1], want[1], strict=True):
            assert_close(a, b, GRAD_TOL[F32])
        print("equal:", what, flush=True)


    # Batch and heads split at once (each device one row and one KV head with its queries).
    mesh = jax.make_mesh((2, 2), ("batch", "heads"))
    spec = P("batch", None, "heads")
    dga = functools.partial(dga_jax.dga_attention, group_size=4, focal_ratio=0.25)
    for selection in ("global", "streaming"):
        fn = functools.partial(dga, selection=selection)
        check(selection, fn, fn, spec, mesh)
    for implementation in ("xla", "blockwise"):
        fn = functools.partial(dga_jax.dense_attention, implementation=implementation)
        check(("dense", implementation), fn, fn, spec, mesh)

    # MInference (forward only: it has no backward), at a length its blocks need.
    from dga_jax.ops.minference import MInferenceConfig, minference_attention
    fn = functools.partial(minference_attention, config=MInferenceConfig())
    qm, km, vm = random_qkv(1, 2, 128, 4, 2, 8)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    placed = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (qm, km, vm))
    assert_close(jax.jit(sharded)(*placed), fn(qm, km, vm), FORWARD_TOL[F32])
    print("equal: minference", flush=True)

    # The sequence split too ("dga" context parallelism by hand): the compressed prefix is
    # summed over the devices, so its gradient is.
    mesh = jax.make_mesh((2, 2), ("batch", "seq"))
    spec = P("batch", "seq")
    split = ContextSplit("seq", 2)
    check("split", dga, functools.partial(dga, split=split), spec, mesh)
    fn = functools.partial(dga_jax.dense_attention, implementation="blockwise")
    check(("split", "dense"), fn, functools.partial(fn, split=split), spec, mesh)

    # Explicit mesh axes (JAX's sharding in types, jax.make_mesh's default), no shard_map: the
    # walks' reshapes and loop carries are not typed for them; the ops run with those axes Auto
    # and give their output q's type.
    mesh = jax.make_mesh((2, 2), ("batch", "heads"), axis_types=(AxisType.Explicit,) * 2)
    spec = P("batch", None, "heads")

    def streaming_llm(q, k, v):
        return sink_attention(q, k, v, q, k, StreamingLLMConfig(4, 8))

    cases = {
        "dga": dga,
        "dga streaming": functools.partial(dga, selection="streaming"),
        "dense": functools.partial(dga_jax.dense_attention, implementation="blockwise"),
        "streaming_llm": streaming_llm,
    }
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        for what, fn in cases.items():
            got, want = value_and_grads(fn, *placed), value_and_grads(fn, q, k, v)
            assert jax.typeof(got[0]).sharding.spec == P(*spec, None), (what, jax.typeof(got[0]))
            assert_close(got[0], want[0], FORWARD_TOL[F32])
            for a, b in zip(got[1], want[1], strict=True):
                assert_close(a, b, GRAD_TOL[F32])
            print("equal, explicit axes:", what, flush=True)
        fn = functools.partial(minference_attention, config=MInferenceConfig())
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (qm, km, vm)]
        assert_close(fn(*placed), fn(qm, km, vm), FORWARD_TOL[F32])
    print("ok")
    """
)


def test_attention_in_a_type_checked_shard_map_and_on_explicit_axes():
    run_on_fake_devices(SCRIPT, devices=4)
