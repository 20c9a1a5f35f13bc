"""The NNX decoder: forward, DGA plug-in, remat, RoPE, sharded construction."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dga_jax import DEFAULT_RULES, DGAConfig, DGAttention, Llama, LogicalRules, ModelConfig
from dga_jax.errors import ConfigError
from dga_jax.model.config import RopeScaling
from dga_jax.model.layers import (
    apply_rope,
    project,
    rope_frequencies,
    scale_channels,
    swiglu,
)
from dga_jax.sharding import MESH_AXES, make_mesh, mesh_shape
from tests.conftest import run_on_fake_devices

TINY = ModelConfig.preset("tiny")


def tokens(b=2, t=40, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, TINY.vocab_size)


@pytest.fixture(scope="module")
def dense_logits():
    return Llama(TINY, rngs=nnx.Rngs(0))(tokens())


def test_forward_shape_and_dtype(dense_logits):
    assert dense_logits.shape == (2, 40, TINY.vocab_size)
    assert dense_logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(dense_logits)))


def test_positions_of_one_row_serve_every_row(dense_logits):
    """[T] positions (an IndexError, 'Too many indices', before) broadcast like [1, T]."""
    model = Llama(TINY, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(tokens(), jnp.arange(40)), dense_logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"int32\[2,9\].*int32\[2,40\]"):
        model(tokens(), jnp.zeros((2, 9), jnp.int32))


@pytest.mark.parametrize("chunks", [1, 2, 8])
def test_token_losses_are_the_logits_cross_entropy(chunks):
    """In slices of the sequence or whole: the loss and its gradients are the logits'."""
    graphdef, params = nnx.split(Llama(TINY, rngs=nnx.Rngs(0)))
    inputs, targets = tokens(), tokens(seed=1)

    def chunked(params):
        return nnx.merge(graphdef, params).token_losses(inputs, targets, chunks=chunks).mean()

    def whole(params):
        logits = nnx.merge(graphdef, params)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    (got, got_grads), (want, want_grads) = (jax.value_and_grad(f)(params) for f in (chunked, whole))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_losses_in_chunks_never_hold_the_whole_logits():
    """Compiled temporaries of the loss's gradient shrink by more than the [B, T, V] logits."""
    config = TINY.replace(vocab_size=8192)
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    inputs = jax.random.randint(jax.random.PRNGKey(0), (2, 256), 0, config.vocab_size)

    def temporaries(chunks):
        def loss(params):
            model = nnx.merge(graphdef, params)
            return model.token_losses(inputs, inputs, chunks=chunks).mean()

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 256 * 8192 * 4
    assert temporaries(8) < temporaries(1) - logits_bytes
    with pytest.raises(ValueError, match="chunks=3 must be a positive int dividing the 40"):
        Llama(TINY, rngs=nnx.Rngs(0)).token_losses(tokens(), tokens(), chunks=3)


def test_token_ids_outside_the_vocabulary_never_read_another_row():
    """A gather clamps 512 to row 511 and wraps -1 (and HF's ignore index -100) to a row from
    the end, silently. Concrete ids are an error naming them; traced ones give NaN."""
    model = Llama(TINY, rngs=nnx.Rngs(0))
    x = tokens(t=8)
    for bad in (TINY.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"tokens\[1, 3\] = {bad} is outside .* \[0, 512\)"):
            model(x.at[1, 3].set(bad))
    with pytest.raises(ValueError, match=r"targets\[0, 2\] = -100 is outside"):
        model.token_losses(x, x.at[0, 2].set(-100))
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, x.at[1, 3].set(-1))
    assert bool(jnp.all(jnp.isfinite(logits[0]))) and bool(jnp.all(jnp.isnan(logits[1, 3])))
    losses = jax.jit(lambda s, y: nnx.merge(graphdef, s).token_losses(x, y, chunks=2))(
        state, x.at[0, 2].set(-100)
    )
    np.testing.assert_array_equal(jnp.isnan(losses), np.arange(16).reshape(2, 8) == 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: m(x[0]), r"tokens must be 2-d integer ids.*got int32\[8\]"),
        (lambda m, x: m(x * 1.0), r"tokens must be 2-d integer ids.*got float32\[2, 8\]"),
        (lambda m, x: m(x[:, :0]), r"no dimension of size 0; got int32\[2, 0\]"),
        (lambda m, x: m(x, jnp.arange(8.0)), r"positions must be integers.*got float32\[8\]"),
        (lambda m, x: m(x, x[None]), r"positions must be integers.*got int32\[1, 2, 8\]"),
        (
            lambda m, x: m(x, jnp.arange(8) + TINY.max_position - 4),
            "positions reach 32771, past the model's max_position=32768",
        ),
        (lambda m, x: m.token_losses(x, x[:, 1:], chunks=2), r"targets \[2, 7\] must have the"),
        (lambda m, x: m.token_losses(x, x, chunks=True), "chunks=True must be a positive int"),
        (
            lambda m, x: Llama(TINY.replace(max_position=4), rngs=nnx.Rngs(0))(x),
            "8 positions are past the model's max_position=4",
        ),
    ],
)
def test_inputs_of_a_wrong_rank_dtype_or_size_are_named(call, match):
    """Errors naming the argument, not a broadcast, gather or reshape failure deep in JAX (or,
    for float positions, a True chunk count, T or given positions past max_position: none at
    all)."""
    with pytest.raises(ValueError, match=match):
        call(Llama(TINY.replace(num_layers=1), rngs=nnx.Rngs(0)), tokens(t=8))


def test_a_config_set_on_a_built_model_is_refused():
    """Its layers keep the config they were built with: `model.config = ...` with another
    attention kind ran the old one silently. The weights load into a model built anew."""
    config = TINY.replace(num_layers=1)
    model = Llama(config, rngs=nnx.Rngs(0))
    model.config = config.replace(attention="dga", dga=DGAConfig(4, 1.0))
    with pytest.raises(ValueError, match=r"model.config differs in \['attention', 'dga'\]"):
        model(tokens(t=8))
    rebuilt = Llama(model.config, rngs=nnx.Rngs(1))
    nnx.update(rebuilt, nnx.state(model, nnx.Param))
    model.config = config
    np.testing.assert_allclose(rebuilt(tokens(t=8)), model(tokens(t=8)), atol=1e-5, rtol=1e-5)


def test_model_is_causal():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    x = tokens()
    changed = x.at[:, 30:].set((x[:, 30:] + 1) % TINY.vocab_size)
    np.testing.assert_allclose(model(x)[:, :30], model(changed)[:, :30], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["global", "streaming"])
def test_dga_with_all_tokens_focal_equals_dense(dense_logits, selection):
    config = TINY.replace(attention="dga", dga=DGAConfig(4, 1.0, selection))
    logits = Llama(config, rngs=nnx.Rngs(0))(tokens())
    np.testing.assert_allclose(logits, dense_logits, atol=1e-4, rtol=1e-4)


def test_dga_changes_the_model(dense_logits):
    config = TINY.replace(attention="dga", dga=DGAConfig(4, 0.1))
    logits = Llama(config, rngs=nnx.Rngs(0))(tokens())
    assert float(jnp.max(jnp.abs(logits - dense_logits))) > 1e-3


REMAT_BASE = TINY.replace(attention="dga", dga=DGAConfig(4, 0.25))


def loss_and_grads(config):
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(tokens(t=16)) ** 2)

    return jax.value_and_grad(loss)(state)


@pytest.fixture(scope="module")
def no_remat():
    return loss_and_grads(REMAT_BASE)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_dots_no_batch"])
def test_remat_keeps_values_and_gradients(no_remat, remat):
    value, grads = no_remat
    value_r, grads_r = loss_and_grads(REMAT_BASE.replace(remat=remat))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, atol=1e-6, rtol=1e-5)


def test_scanned_and_unrolled_layers_are_one_model(no_remat):
    # The tiny preset unrolls its layers (scan_layers=False); a scan over the same stacked
    # weights computes the same values, gradients, prefill and decoding.
    assert not REMAT_BASE.scan_layers
    scanned = REMAT_BASE.replace(scan_layers=True)
    value, grads = loss_and_grads(scanned)
    np.testing.assert_allclose(value, no_remat[0], rtol=1e-6)
    for g, g_u in zip(jax.tree.leaves(grads), jax.tree.leaves(no_remat[1]), strict=True):
        np.testing.assert_allclose(g, g_u, atol=1e-6, rtol=1e-5)
    decoded = []
    for config in (scanned, REMAT_BASE):
        model = Llama(config, rngs=nnx.Rngs(0))
        prompt = tokens(t=12)
        logits, caches = model.prefill(prompt, 16)
        step_logits, _ = model.decode_step(prompt[:, -1], caches)
        decoded.append((logits, step_logits))
    for a, b in zip(*decoded, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="model.scan_layers must be a bool, got 'no'"):
        REMAT_BASE.replace(scan_layers="no")


@pytest.mark.parametrize("remat, saved", [("full", 0), ("save_dots", 2), ("save_dots_no_batch", 2)])
def test_remat_policies_see_the_projections(capsys, remat, saved):
    """The dot policies save the MLP's gate and up outputs (its [T, F] projections), though their
    dots sit in `layers.project`'s custom_vjp."""
    config = TINY.replace(attention="dense", intermediate_size=72, remat=remat)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    t = tokens(t=16)
    jax.ad_checkpoint.print_saved_residuals(lambda s: nnx.merge(graphdef, s)(t).sum(), state)
    lines = capsys.readouterr().out.splitlines()
    projections = [
        x for x in lines if f",16,{config.intermediate_size}]" in x and "argument" not in x
    ]
    assert len(projections) == saved, lines


def test_rope_scores_depend_on_relative_position():
    inv_freq = rope_frequencies(32, 10000.0, RopeScaling())
    q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 32))

    def score(i, j):
        qi = apply_rope(q, jnp.array([[i]]), inv_freq)
        kj = apply_rope(k, jnp.array([[j]]), inv_freq)
        return float(jnp.sum(qi * kj))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def assert_vjp_matches(ours, theirs, args, d_out, tol):
    """`ours` and `theirs` agree in output and every input gradient: shape, dtype and values."""
    out_a, vjp_a = jax.vjp(ours, *args)
    out_b, vjp_b = jax.vjp(theirs, *args)
    results_a, results_b = (out_a, *vjp_a(d_out)), (out_b, *vjp_b(d_out))
    assert [(a.shape, a.dtype) for a in results_a] == [(b.shape, b.dtype) for b in results_b]
    for a, b in zip(results_a, results_b, strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_channels_gradients_are_autodiffs(dtype):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 24, 16)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(3), (16,)).astype(dtype)
    ct = jax.random.normal(jax.random.PRNGKey(4), (2, 24, 16)).astype(dtype)
    tol = 1e-6 if dtype == jnp.float32 else 5e-2
    assert_vjp_matches(scale_channels, lambda x, w: x * w, (x, w), ct, tol)


@pytest.mark.parametrize("out_dtype", [None, jnp.float32])  # float32: the LM head's logits
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "x_shape, w_shape, axes",
    [((2, 24, 16), (16, 40), 1), ((2, 24, 16), (16, 4, 8), 1), ((2, 24, 4, 8), (4, 8, 16), 2)],
)
def test_project_gradients_are_autodiffs(x_shape, w_shape, axes, dtype, out_dtype):
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(keys[0], x_shape).astype(dtype)
    w = jax.random.normal(keys[1], w_shape).astype(dtype)
    ct = jax.random.normal(keys[2], x_shape[: len(x_shape) - axes] + w_shape[axes:])
    ct = ct.astype(out_dtype or dtype)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert_vjp_matches(
        lambda x, w: project(x, w, axes, out_dtype),
        lambda x, w: jnp.tensordot(x, w, axes, preferred_element_type=out_dtype),
        (x, w),
        ct,
        tol,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_gradients_are_autodiffs(dtype):
    gate, up, ct = (
        jax.random.normal(k, (2, 24, 40)).astype(dtype)
        for k in jax.random.split(jax.random.PRNGKey(6), 3)
    )
    tol = 1e-6 if dtype == jnp.float32 else 5e-2
    assert_vjp_matches(swiglu, lambda g, u: jax.nn.silu(g) * u, (gate * 4, up), ct, tol)


def test_partial_rope_rotates_the_first_channels_only():
    """rotary_dim R: the first R channels rotate as a head of R channels would, the rest pass
    unrotated and unscaled (transformers' Phi-3), cos and sin scaled on the rotated ones."""
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 5, 3, 32))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    inv_freq = rope_frequencies(8, 10000.0, RopeScaling())
    out = apply_rope(x, positions, inv_freq, 1.3)
    np.testing.assert_array_equal(out[..., 8:], x[..., 8:])
    np.testing.assert_array_equal(out[..., :8], apply_rope(x[..., :8], positions, inv_freq, 1.3))
    assert float(jnp.max(jnp.abs(out[..., :8] - x[..., :8] * 1.3))) > 0.1


def test_lm_infinite_unrotated_keys_scale_only_the_rotated_channels():
    """LM-Infinite scores its first tokens with un-rotated keys, keys at position 0: with YaRN's
    cos and sin scale and partial RoPE, the rotated channels carry the scale, the rest none."""
    yarn = RopeScaling("yarn", 8.0, original_max_position=32)
    config = ModelConfig.preset("tiny", attention="lm_infinite", rope_scaling=yarn, rotary_dim=8)
    attn = DGAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(8), (1, 6, config.d_model))
    positions = jnp.broadcast_to(jnp.arange(6), (1, 6))
    _, k, _, _, k_far = attn._sink_qkv(x, positions)
    _, k_plain, _ = attn._projections(x)
    scale = yarn.attention_scaling
    assert scale > 1.2
    np.testing.assert_allclose(k_far[..., :8], k_plain[..., :8] * scale, rtol=1e-6)
    np.testing.assert_array_equal(k_far[..., 8:], k_plain[..., 8:])
    np.testing.assert_array_equal(k[..., 8:], k_plain[..., 8:])


def test_linear_rope_scaling_divides_positions():
    scaled = rope_frequencies(32, 10000.0, RopeScaling("linear", 2.0))
    np.testing.assert_allclose(scaled * 2, rope_frequencies(32, 10000.0, RopeScaling()))


def test_dga_attention_module_plugs_into_other_models():
    class Block(nnx.Module):  # somebody else's model, using DGA as a component
        def __init__(self, rngs):
            self.attn = DGAttention(TINY.replace(attention="dga"), rngs=rngs)
            self.scale = nnx.Param(jnp.ones(TINY.d_model))

        def __call__(self, x):
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            return self.attn(x * self.scale[...], positions)

    block = Block(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 50, TINY.d_model))
    assert block(x).shape == x.shape
    params = nnx.state(block, nnx.Param)
    assert {"q", "k", "v", "o"} <= set(params["attn"].keys())
    # Every row's positions as one [T], as Llama takes them (an IndexError before).
    every_row = jnp.broadcast_to(jnp.arange(50), (2, 50))
    np.testing.assert_array_equal(block.attn(x, jnp.arange(50)), block.attn(x, every_row))


def test_parameters_carry_logical_axes():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    assert model.layers.attn.q.get_metadata()["logical_axes"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    assert model.embed.get_metadata()["logical_axes"] == ("vocab", "embed")


def test_rules_reject_a_mesh_axis_used_twice():
    rules = LogicalRules((("embed", "fsdp"), ("mlp", "fsdp")))
    with pytest.raises(ValueError, match="twice"):
        rules.spec(("embed", "mlp"))
    # Weights over fsdp and seq (ZeRO-3 over the context-parallel group), heads over tensor.
    assert DEFAULT_RULES.spec(("embed", "heads", "head_dim")) == jax.sharding.PartitionSpec(
        ("fsdp", "seq"), "tensor", None
    )


def test_rules_reject_a_name_listed_twice_and_axes_the_mesh_lacks():
    """A prepended override `(("batch", None),) + DEFAULT_RULES.rules` (Flax's rules: first match
    wins) was ignored silently (the last won); an axis missing from the mesh failed in JAX."""
    with pytest.raises(ValueError, match=r"name \['batch'\] more than once"):
        LogicalRules((("batch", None), *DEFAULT_RULES.rules))
    with pytest.raises(ValueError, match=r"\('batch', \('data', 'data'\)\).*distinct names"):
        LogicalRules((("batch", ("data", "data")),))
    with pytest.raises(ValueError, match="a logical rule is a .name, mesh axes. pair, got 'batch'"):
        LogicalRules({"batch": "data"})
    typo = LogicalRules((("batch", "dta"),))
    assert typo.spec(("batch",)) == jax.sharding.PartitionSpec("dta")  # no mesh: names only
    lacking = pytest.raises(ValueError, match=r"'batch' maps to 'dta', but the mesh .* has axes")
    with jax.set_mesh(make_mesh((1, 1, 1, 1))), lacking:
        typo.spec(("batch",))


def test_make_mesh_fills_a_minus_one_and_names_bad_sizes():
    assert make_mesh((-1, 1, 1, 1)).shape == dict(data=1, fsdp=1, seq=1, tensor=1)
    for bad in [(0, 1, 1, 1), (1.0, 1, 1, 1), (True, 1, 1, 1), (1, 1, 1)]:
        with pytest.raises(ConfigError, match=r"mesh shape: give 4 sizes .*, ints >= 1"):
            make_mesh(bad)
    with pytest.raises(ConfigError, match=r"mesh: give 4 sizes .*got \['2', 1, 1, 1\]"):
        mesh_shape(["2", 1, 1, 1], 2)


def test_builds_under_a_one_device_mesh(dense_logits):
    with jax.set_mesh(make_mesh((1, 1, 1, 1))):
        model = Llama(TINY, rngs=nnx.Rngs(0))
        assert isinstance(model.layers.attn.q[...].sharding, jax.sharding.NamedSharding)
        logits = model(tokens())
    np.testing.assert_allclose(logits, dense_logits, atol=1e-6)


def test_refuses_a_mesh_with_explicit_axes():
    """Logical rules place by Auto axes; an Explicit mesh (jax.make_mesh's default) failed deep
    in the embedding gather. Now a clear error, whether the model is built or called under it."""
    mesh = jax.make_mesh(
        (1, 1, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * len(MESH_AXES)
    )
    model = Llama(TINY, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"Explicit axes \['data', 'fsdp', 'seq', 'tensor'\]"):
            Llama(TINY, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="dga_jax.make_mesh"):
            model(tokens())


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dga_jax import DEFAULT_RULES, DGAConfig, Llama, ModelConfig, make_mesh
    config = ModelConfig.preset("tiny", attention="dga", dga=DGAConfig(4, 0.25))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 48), 0, config.vocab_size)
    expected = Llama(config, rngs=nnx.Rngs(0))(tokens)
    for shape in [(2, 2, 1, 2), (1, 2, 2, 2), (8, 1, 1, 1)]:
        mesh = make_mesh(shape)
        with jax.set_mesh(mesh):
            model = Llama(config, rngs=nnx.Rngs(0))
            q = model.layers.attn.q
            spec = DEFAULT_RULES.spec(q.get_metadata()["logical_axes"])
            assert q[...].sharding.is_equivalent_to(jax.NamedSharding(mesh, spec), 4), spec
            assert len(q[...].sharding.device_set) == 8
            graphdef, state = nnx.split(model)
            logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
            # The loss in 4 strided slices of the sequence, split or not over the seq axis.
            losses = jax.jit(
                lambda s, t: nnx.merge(graphdef, s).token_losses(t, t[:, ::-1], chunks=4)
            )(state, tokens)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
        picked = jnp.take_along_axis(expected, tokens[:, ::-1, None], axis=-1)[..., 0]
        np.testing.assert_allclose(
            losses, jax.nn.logsumexp(expected, axis=-1) - picked, atol=1e-4, rtol=1e-4
        )
    # Padded prefill with the sequence split: 1 KV head per tensor shard over 4 parts, so
    # "auto" attends with "dga" context parallelism; valid positions equal one device's.
    lengths = jnp.array([48, 13])
    for kind in ("dense", "dga"):
        one_layer = config.replace(attention=kind, num_layers=1)
        want, _ = Llama(one_layer, rngs=nnx.Rngs(0)).prefill(tokens[:2], 56, lengths=lengths)
        with jax.set_mesh(make_mesh((1, 1, 4, 2))):
            got, _ = Llama(one_layer, rngs=nnx.Rngs(0)).prefill(tokens[:2], 56, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            np.testing.assert_allclose(got[b, :n], want[b, :n], atol=1e-4, rtol=1e-4)
    print("ok")
    """
)


def test_builds_sharded_on_eight_fake_devices():
    run_on_fake_devices(SHARDED)


def test_prefill_and_decode_step_check_tokens_as_the_forward_does():
    """prefill embedded an id outside the vocabulary as NaN logits (the forward names it), ran
    past max_position silently and failed deep in JAX on float or 1-d tokens; decode_step took
    ids outside the vocabulary and a batch unlike the caches' (a broadcast TypeError)."""
    config = TINY.replace(num_layers=1, max_position=16)
    model = Llama(config, rngs=nnx.Rngs(0))
    x = tokens(t=8)
    for bad, match in [
        (x.at[1, 3].set(-1), r"tokens\[1, 3\] = -1 is outside .* \[0, 512\)"),
        (x * 1.0, r"tokens must be 2-d integer ids.*got float32\[2, 8\]"),
        (x[0], r"tokens must be 2-d integer ids.*got int32\[8\]"),
        (tokens(t=20), "20 positions are past the model's max_position=16"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.prefill(bad, 24)
    # Right-padded rows may pad past max_position: their own lengths are the caller's to check.
    padded, _ = model.prefill(tokens(t=20), 24, lengths=jnp.array([16, 5]), last_only=True)
    assert padded.shape == (2, 1, config.vocab_size)
    _, caches = model.prefill(x, 16)
    with pytest.raises(ValueError, match=r"tokens\[0\] = 512 is outside"):
        model.decode_step(jnp.array([512, 3]), caches)
    with pytest.raises(ValueError, match=r"tokens \[3\]: decode_step takes one token .* 2 rows"):
        model.decode_step(jnp.array([1, 2, 3]), caches)
    # A full model's cache: position 15 is the last max_position=16 holds.
    _, caches = model.prefill(tokens(t=15), 20)
    _, caches = model.decode_step(jnp.array([1, 2]), caches)
    with pytest.raises(ValueError, match="write position 16, past the model's max_position=16"):
        model.decode_step(jnp.array([1, 2]), caches)


def test_prefill_selects_with_the_importance_passes_of_the_default_implementation(monkeypatch):
    """attention_impl=None: prefill's selection asks for the passes of what the attention runs
    (the Triton kernels' for 16-bit inputs on a GPU), not XLA's loops for every None."""
    from dga_jax.model import attention as attention_module

    asked = []

    def passes(implementation, interpret=False):
        asked.append(implementation)
        return None  # XLA's loops: runs anywhere

    monkeypatch.setattr(attention_module, "default_for", lambda q, k, v: "pallas_gpu")
    monkeypatch.setattr(attention_module, "importance_implementation", passes)
    config = TINY.replace(num_layers=1, attention="dga", attention_impl=None)
    Llama(config, rngs=nnx.Rngs(0)).prefill(tokens(t=8), 16)
    assert asked == ["pallas_gpu"]
    asked.clear()
    Llama(config.replace(attention_impl="xla"), rngs=nnx.Rngs(0)).prefill(tokens(t=8), 16)
    assert asked == ["xla"]
