"""The paper's analyses on tiny random models: weights, P_sparse, noise KL, DGA mass shares."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dga_jax import DGAConfig, Llama, ModelConfig, dense_attention, dga_attention
from dga_jax.eval import analysis, dga_analysis, layerwise, plots
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import dga_layout
from tests.conftest import FORWARD_TOL, assert_close, random_qkv

TOL = FORWARD_TOL[jnp.float32]
TINY = ModelConfig.preset("tiny", num_layers=2, dga=DGAConfig(4, 0.25))


def tokens(b: int = 2, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, TINY.vocab_size))


def _input_probe(layer, x, positions):
    return x


# One model built once: the DGA models are views of its weights (`with_attention`), and most
# tests share the [2, 32] batch shape, so that they share compiles.
@pytest.fixture(scope="module")
def dense():
    return Llama(TINY, rngs=nnx.Rngs(0))


def test_attention_weights_are_causal_rows_that_reproduce_the_model(dense):
    x = tokens()
    weights = analysis.attention_weights(dense, x)
    assert [w.shape for w in weights] == [(2, TINY.num_heads, 32, 32)] * TINY.num_layers
    for w in weights:
        assert_close(w.sum(-1), np.ones(w.shape[:-1]), TOL)
        assert np.all(np.triu(w, k=1) == 0) and np.all(w >= 0)

    embedded = dense.embed_tokens(jnp.asarray(x))
    _, inputs = layerwise.walk_layers(dense, embedded, _input_probe)
    positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
    group = TINY.num_heads // TINY.num_kv_heads
    for i, (w, h) in enumerate(zip(weights, inputs, strict=True)):
        layer = layerwise.decoder_layer(dense, i)
        q, k, v = layerwise.layer_qkv(layer, h, positions)
        out = jnp.einsum("bhqs,bshd->bqhd", w, jnp.repeat(v, group, axis=2))
        assert_close(out, dense_attention(q, k, v, implementation="xla"), TOL)
    # The last layer's weights with V, through the rest of the layer and the head: the logits.
    attended = h + layer.attn._project(out)
    assert_close(dense.logits(layer._mlp_block(attended)), dense(jnp.asarray(x)), TOL)
    assert_close(layerwise.logits_from_embeddings(dense, embedded), dense(jnp.asarray(x)), TOL)
    chosen = analysis.attention_weights(dense, x, layers=[1])
    assert chosen[0] is None
    assert_close(chosen[1], weights[1], TOL)


def test_p_sparse_of_uniform_attention_is_known(dense):
    """q = 0: every query's weights are uniform, 1/n_i. Against 1/(rho n_i) that never exceeds
    (rho <= 1); against 1/(rho L) it does exactly for n_i < rho L."""
    uniform = nnx.clone(dense)
    uniform.layers.attn.q[...] = jnp.zeros_like(uniform.layers.attn.q[...])
    seqs = {32: tokens()}
    context = analysis.p_sparse(uniform, seqs, rho=0.25, context_fraction=0.0)[32]
    assert context.mean == 0.0 and context.stderr == 0.0
    length = analysis.p_sparse(uniform, seqs, 0.25, threshold="length", context_fraction=0.0)[32]
    assert length.mean == pytest.approx(7 / 32) and length.stderr == 0.0  # n_i = 1..7 of 32
    assert (length.sequences, length.queries) == (2, 32)
    # From the second half on (n_i >= 16), 1/n_i <= 1/16 < 1/8: none.
    assert analysis.p_sparse(uniform, seqs, 0.25, threshold="length")[32].mean == 0.0


@pytest.mark.parametrize(
    ("threshold", "fraction", "rho"), [("context", 0.5, 0.5), ("length", 0.25, 0.3)]
)
def test_p_sparse_matches_a_direct_count_on_the_weights(dense, threshold, fraction, rho):
    seqs = {length: tokens(seed=length, t=length) for length in (16, 32)}
    results = analysis.p_sparse(dense, seqs, rho, threshold=threshold, context_fraction=fraction)
    for length, x in seqs.items():
        weights = np.stack(analysis.attention_weights(dense, x))  # [layers, N, H, L, L]
        shares = np.zeros((2, TINY.num_layers))
        counted = [i for i in range(length) if i + 1 >= math.ceil(fraction * length)]
        for n, layer, head, i in np.ndindex(2, TINY.num_layers, TINY.num_heads, length):
            if i in counted:
                tau = 1 / (rho * ((i + 1) if threshold == "context" else length))
                shares[n, layer] += weights[layer, n, head, i, : i + 1].max() > tau
        shares /= TINY.num_heads * len(counted)
        got = results[length]
        assert 0 < got.mean < 1, "a trivial case checks nothing"
        assert got.queries == len(counted)
        assert got.mean == pytest.approx(shares.mean())
        assert got.stderr == pytest.approx(shares.mean(1).std(ddof=1) / math.sqrt(2))
        np.testing.assert_allclose(got.per_layer, shares.mean(0))


def test_p_sparse_rejects_bad_arguments(dense):
    with pytest.raises(ValueError, match="rho"):
        analysis.p_sparse(dense, {8: tokens(t=8)}, rho=0.0)
    with pytest.raises(ValueError, match="threshold"):
        analysis.p_sparse(dense, {8: tokens(t=8)}, threshold="query")
    with pytest.raises(ValueError, match=r"\[N >= 1, 8\]"):
        analysis.p_sparse(dense, {8: tokens(t=9)})


def test_noise_kl_is_zero_without_noise_and_grows_with_it(dense):
    x, key = tokens(b=4), jax.random.PRNGKey(1)
    kls = [analysis.noise_kl(dense, x, sigma, key, batch_size=2) for sigma in (0.0, 0.1, 1.0)]
    assert kls[0] == 0.0 and 0 < kls[1] < kls[2]
    absolute = 0.1 * analysis.embedding_rms(dense)
    assert analysis.noise_kl(dense, x, absolute, key, relative=False, batch_size=2) == (
        pytest.approx(kls[1], rel=1e-4)
    )


def test_dense_and_dga_views_share_weights(dense):
    view = layerwise.with_attention(dense, "dga", DGAConfig(8, 0.5))
    assert view.config == dense.config.replace(attention="dga", dga=DGAConfig(8, 0.5))
    assert view.layers.attn.config.attention == "dga" and dense.config.attention == "dense"
    leaves = zip(jax.tree.leaves(nnx.state(view)), jax.tree.leaves(nnx.state(dense)), strict=True)
    assert all(ours is theirs for ours, theirs in leaves)
    kls = analysis.compare_noise_kl(dense, tokens(), [0.0, 0.5], jax.random.PRNGKey(2))
    assert kls["dense"][0.0] == kls["dga"][0.0] == 0.0
    assert kls["dense"][0.5] > 0 and kls["dga"][0.5] > 0 and kls["dense"][0.5] != kls["dga"][0.5]


@functools.partial(jax.jit, static_argnames="config")
def _from_entry_weights(q, k, v, config):
    """From `dga_entry_weights` of all queries at once: the DGA output [B, L, Hq, D] and the
    focal/group/raw mass [3]; and `dga_mass` of the same, by blocks of 8 queries."""
    layout = dga_layout(q, k, config, q.shape[-1] ** -0.5)
    prefix, raw = gather_entries(layout, k, v)
    prefix_w, raw_w = dga_analysis.dga_entry_weights(q, prefix, raw)
    group = q.shape[2] // k.shape[2]
    out = jnp.einsum("bhqn,bhnd->bqhd", prefix_w, jnp.repeat(prefix.v, group, axis=1))
    out += jnp.einsum("bhqn,bhnd->bqhd", raw_w, jnp.repeat(raw.v, group, axis=1))
    is_group = jnp.repeat(layout.prefix_is_group, group, axis=1)[:, :, None, :]
    mass = jnp.stack([jnp.sum(prefix_w * ~is_group), jnp.sum(prefix_w * is_group), raw_w.sum()])
    return out, mass, dga_analysis.dga_mass(q, k, v, config, block=8)


@pytest.mark.parametrize("selection", ["global", "streaming"])
def test_dga_entry_weights_reproduce_dga_attention(selection):
    config = DGAConfig(4, 0.1, selection)
    q, k, v = random_qkv(0, 2, 45, 4, 2, 16)
    expected = dga_attention(
        q, k, v, group_size=4, focal_ratio=0.1, selection=selection, implementation="reference"
    )
    out, mass, blocked_mass = _from_entry_weights(q, k, v, config)
    assert_close(out, expected, TOL)
    assert_close(blocked_mass, mass, TOL)
    assert float(mass.sum()) == pytest.approx(2 * 4 * 45) and np.all(mass > 0)


@pytest.mark.parametrize("selection", ["global", "streaming"])
def test_token_roles_partition_what_each_query_sees(selection):
    """Every position up to the query has one role, none after it, and the roles count the
    entries the query's DGA weights are spread over: a focal token, m per group, a raw token."""
    config = DGAConfig(4, 0.1, selection)
    q, k, v = random_qkv(2, 2, 45, 4, 2, 16)
    layout = dga_layout(q, k, config, 16**-0.5)
    prefix, raw = gather_entries(layout, k, v)
    prefix_w, raw_w = dga_analysis.dga_entry_weights(q, prefix, raw)  # [B, Hq, T, N]
    for t in (0, 6, 21, 44):
        roles = dga_analysis.token_roles(q, k, config, query=t, batch=1, head=1)
        assert (roles[: t + 1] >= 0).all() and (roles[t + 1 :] == -1).all()
        seen_prefix = np.asarray(prefix_w[1, 2, t] > 0)  # query head 2 reads KV head 1
        is_group = np.asarray(layout.prefix_is_group[1, 1])
        expected = [(seen_prefix & ~is_group).sum(), 4 * (seen_prefix & is_group).sum()]
        expected.append(int((raw_w[1, 2, t] > 0).sum()))
        assert np.bincount(roles[roles >= 0], minlength=3).tolist() == expected, t
    focal = np.asarray(layout.focal[1, 1])
    if selection == "global":  # at the last query every focal token is one
        assert ((roles == 0) == focal).all()


def test_max_causal_weights_by_blocks():
    q, k, _ = random_qkv(1, 2, 45, 4, 2, 16)
    blocked = jax.jit(analysis.max_causal_weights, static_argnames="block")(q, k, block=8)
    assert_close(blocked, analysis.causal_weights(q, k).max(-1), TOL)


def test_dga_mass_shares_sum_to_one_per_layer(dense):
    shares = dga_analysis.dga_mass_shares(layerwise.with_attention(dense, "dga"), tokens(b=4))
    assert len(shares) == TINY.num_layers
    for layer in shares:
        assert sum(layer.values()) == pytest.approx(1.0)
        assert all(0 < layer[kind] < 1 for kind in dga_analysis.MASS_KINDS)


@pytest.mark.parametrize(("dga", "length"), [(DGAConfig(4, 1.0), 32), (DGAConfig(4, 0.1), 3)])
def test_dga_mass_shares_without_groups(dense, dga, length):
    """Everything focal, or a sequence shorter than one group: no group mass."""
    shares = dga_analysis.dga_mass_shares(
        layerwise.with_attention(dense, "dga", dga), tokens(t=length)
    )
    for layer in shares:
        assert layer["group"] == 0.0 and layer["focal"] > 0
        if dga.focal_ratio == 1.0:
            assert layer == {"focal": 1.0, "group": 0.0, "raw": 0.0}


def test_dga_mass_shares_need_a_dga_model(dense):
    with pytest.raises(ValueError, match="DGA model"):
        dga_analysis.dga_mass_shares(dense, tokens())


def test_plots_write_pngs(tmp_path):
    estimate = analysis.SparsityEstimate(64, 0.01, 0.5, 0.1, 4, 32, np.array([0.4, 0.6]))
    results = {64: estimate, 256: estimate}
    for path in (
        analysis.plot_p_sparse(results, tmp_path / "one.png"),
        analysis.plot_p_sparse({"dense": results, "dga": results}, tmp_path / "two.png"),
        dga_analysis.plot_mass_shares(
            [{"focal": 0.5, "group": 0.3, "raw": 0.2}] * 2, tmp_path / "plots" / "mass.png"
        ),
        dga_analysis.plot_token_roles(np.array([0, 1, 1, 2, -1], np.int8), tmp_path / "roles.png"),
    ):
        assert path.read_bytes().startswith(b"\x89PNG")


def test_plots_of_nothing_name_the_problem_and_one_point_or_nan_plots(tmp_path):
    estimate = analysis.SparsityEstimate(64, 0.01, math.nan, math.nan, 1, 32, np.array([0.4]))
    assert analysis.plot_p_sparse({64: estimate}, tmp_path / "one.png").exists()
    for empty in ({}, {"dense": {}, "dga": {64: estimate}}):  # were a bare StopIteration
        with pytest.raises(ValueError, match="plot_p_sparse needs estimates to plot"):
            analysis.plot_p_sparse(empty, tmp_path / "none.png")
    for roles in (np.array([], np.int8), np.array([-1, -1], np.int8)):  # a zero-size max()
        with pytest.raises(ValueError, match="with a position it sees"):
            dga_analysis.plot_token_roles(roles, tmp_path / "roles.png")
    with pytest.raises(ValueError, match=r"needs \[rows, cols\] = \[1 y ticks, 1 x ticks\]"):
        plots.heatmap(tmp_path / "h.png", np.ones((1, 2)), ["a"], ["b"], "x", "y")  # mislabels
    assert not (tmp_path / "h.png").exists()


def test_p_sparse_of_several_rho_is_not_labelled_with_the_first(tmp_path, monkeypatch):
    labels = []

    def keep_label(fig, path):
        labels.append(fig.axes[0].get_ylabel())
        return str(path)

    monkeypatch.setattr(analysis, "save", keep_label)
    one = analysis.SparsityEstimate(64, 0.01, 0.5, 0.1, 4, 32, np.array([0.5]))
    other = dataclasses.replace(one, rho=0.1)
    analysis.plot_p_sparse({"rho 0.01": {64: one}, "rho 0.1": {64: other}}, tmp_path / "a.png")
    analysis.plot_p_sparse({64: one}, tmp_path / "b.png")
    assert labels == ["P_sparse(L, rho)", "P_sparse(L, rho=0.01)"]


def test_the_analyses_refuse_rows_past_max_position():
    # The model's forward refuses them; the layer walk ran them, RoPE extrapolating silently.
    short = Llama(TINY.replace(attention="dga", max_position=16), rngs=nnx.Rngs(0))
    message = "32 positions are past the model's max_position=16"
    with pytest.raises(ValueError, match=message):
        dga_analysis.dga_mass_shares(short, tokens(1, 32))
    with pytest.raises(ValueError, match=message):
        layerwise.walk_layers(short, short.embed_tokens(jnp.asarray(tokens(1, 32))))


def test_mass_shares_of_no_layer_are_refused_not_an_empty_plot(tmp_path):
    with pytest.raises(ValueError, match="plot_mass_shares needs the shares of one layer or more"):
        dga_analysis.plot_mass_shares([], tmp_path / "mass.png")
    assert not (tmp_path / "mass.png").exists()
