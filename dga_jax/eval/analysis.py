"""The paper's attention analyses on a `Llama`: attention weights, sparsity P_sparse(L, rho),
output KL under input noise, and where DGA's attention mass goes (`shared/EVAL_NOTES.md`).

Everything runs the model's own modules layer by layer (`walk_layers`): each decoder layer is
sliced out of the stacked parameters, a *probe* reads what it needs from the layer's input
(the layer's own `attn_norm` and q/k/v projections with RoPE), and the layer itself computes
the next hidden state, with the model's attention (dense or DGA). A probe reduces its T x T
weights to a few numbers per query, block of queries by block, so the estimators hold no
layer's full weights: memory stays O(T x QUERY_BLOCK) per head at T = 4K and beyond.

Attention weights are those of the model's q and k: dense causal softmax over positions
0..t (`causal_weights`), or for DGA the softmax over the compressed KV' of the spec
(`dga_entry_weights`). They are computed in float32 with the model's scale 1/sqrt(head_dim).
Sequences are whole rows at positions 0..T-1 (no padding, no zig-zag sequence split).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.eval.plots import figure, save
from dga_jax.model.config import ModelConfig
from dga_jax.model.llama import DecoderLayer, Llama
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.intervals import Entries
from dga_jax.sharding import LogicalRules

QUERY_BLOCK = 512  # queries whose weights a probe holds at once: [B, H, QUERY_BLOCK, T] floats
THRESHOLDS = ("context", "length")
MASS_KINDS = ("focal", "group", "raw")

# probe(layer, x [B, T, D], positions [B, T]) -> any pytree of arrays, computed in the jit.
Probe = Callable[[DecoderLayer, jax.Array, jax.Array], Any]


# ---------------------------------------------------------------------------------------------
# Running the layers


def walk_layers(
    model: Llama,
    x: jax.Array,
    probe: Probe | None = None,
    layers: Collection[int] | None = None,
) -> tuple[jax.Array, list[Any]]:
    """Runs the decoder layers in order on embeddings x [B, T, D] at positions 0..T-1.

    Returns (the last layer's output [B, T, D], which `model.logits` turns into the model's
    logits, and per layer `probe(layer, layer input, positions)` or None). `layers`: the layer
    indices to probe (default all). Probes are static jit arguments: module-level functions,
    so that every layer and every call of the same shapes reuses one compile.
    """
    positions = _positions(model, *x.shape[:2])
    graphdef, state = nnx.split(model.layers)
    wanted = range(model.config.num_layers) if layers is None else layers
    outs = []
    for i in range(model.config.num_layers):
        layer_probe = probe if i in wanted else None
        x, out = _layer_step(graphdef, layer_probe, _layer_state(state, i), x, positions)
        outs.append(out)
    return x, outs


def decoder_layer(model: Llama, index: int) -> DecoderLayer:
    """Layer `index` of the model's stacked layers as a module of its own (sharing arrays)."""
    graphdef, state = nnx.split(model.layers)
    return nnx.merge(graphdef, _layer_state(state, index))


def logits_from_embeddings(model: Llama, x: jax.Array) -> jax.Array:
    """The model's forward from input embeddings x [B, T, D]: float32 logits [B, T, V]."""
    graphdef, state = nnx.split(model)
    return _logits(graphdef, state, walk_layers(model, x)[0])


def layer_qkv(
    layer: DecoderLayer, x: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention inputs of layer input x [B, T, D]: q [B, T, H, K], k/v [B, T, Hkv, K],
    q and k rotated, exactly as the layer computes them."""
    return layer.attn._qkv(layer.attn_norm(x), positions)


def with_attention(model: Llama, attention: str, dga: DGAConfig | None = None) -> Llama:
    """The same weights (shared, not copied) in a model whose `config.attention` (and `dga`,
    if given) are changed: a dense and a DGA view of one checkpoint. A changed kind takes its
    default implementation (`attention_impl` names one kind's backend)."""
    changes = {} if dga is None else {"dga": dga}
    if attention != model.config.attention:
        changes.update(attention=attention, attention_impl=None)
    config = model.config.replace(**changes)
    graphdef, _ = nnx.split(nnx.eval_shape(functools.partial(_build, config, model.rules)))
    return nnx.merge(graphdef, nnx.state(model))


def _build(config: ModelConfig, rules: LogicalRules) -> Llama:
    return Llama(config, rules, rngs=nnx.Rngs(0))


def _positions(model: Llama, batch: int, seq_len: int) -> jax.Array:
    """[B, T] positions 0..T-1: the analyses need rows in sequence order."""
    if not np.array_equal(model.row_positions(seq_len), np.arange(seq_len)):
        raise ValueError("the analyses need whole sequences in order, not a zig-zag split")
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))


def _scale(q: jax.Array) -> float:
    """1/sqrt(head_dim): the logit scale of the model's attention (it passes no other)."""
    return 1.0 / math.sqrt(q.shape[-1])


def _layer_state(state: nnx.State, index: int) -> nnx.State:
    return jax.tree.map(functools.partial(_take, index), state)


def _take(index: int, x: jax.Array) -> jax.Array:
    return x[index]


@functools.partial(jax.jit, static_argnames=("graphdef", "probe"))
def _layer_step(graphdef, probe, state, x, positions):
    layer = nnx.merge(graphdef, state)
    out = None if probe is None else probe(layer, x, positions)
    return layer(x, positions), out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state).logits(x)


# ---------------------------------------------------------------------------------------------
# Dense causal weights


def causal_weights(q: jax.Array, k: jax.Array, first: int = 0) -> jax.Array:
    """Causal softmax weights of queries q [B, C, Hq, D] at positions first..first+C-1 over keys
    k [B, T, Hkv, D] at 0..T-1: float32 [B, Hq, C, T], zero at keys after the query.

    Query head h reads KV head h // (Hq / Hkv), as in GQA; the scale is 1/sqrt(D).
    """
    b, c, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d)
    logits = jnp.einsum("bckgd,btkd->bkgct", qg, k.astype(jnp.float32)) * _scale(q)
    t = first + jnp.arange(c)
    visible = jnp.arange(k.shape[1])[None, :] <= t[:, None]  # [C, T]
    weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return weights.reshape(b, hq, c, k.shape[1])


def attention_weights(
    model: Llama, tokens: jax.Array, layers: Collection[int] | None = None
) -> list[np.ndarray | None]:
    """Dense causal softmax weights of every layer: tokens [B, T] -> per layer float32
    [B, H, T, T] (rows: queries, columns: keys; None for a layer not in `layers`).

    The weights of the model's own q and k at each layer, whose input is the previous layers'
    output with the model's attention (so for a DGA model: DGA-propagated hidden states, dense
    weights). Holds B * H * T^2 floats per layer returned (2 GiB per row for 32 heads at 4K):
    for long sequences pick `layers` or use a reducing probe (`max_attention_weights`).
    """
    tokens = jnp.asarray(tokens)
    _, outs = walk_layers(model, model.embed_tokens(tokens), _weights_probe, layers)
    return [None if out is None else np.asarray(out) for out in outs]


def max_attention_weights(model: Llama, tokens: jax.Array) -> np.ndarray:
    """The largest causal weight of each query: tokens [B, T] -> float32 [layers, B, H, T]."""
    tokens = jnp.asarray(tokens)
    _, outs = walk_layers(model, model.embed_tokens(tokens), _max_weight_probe)
    return np.stack([np.asarray(out) for out in outs])


def _weights_probe(layer: DecoderLayer, x: jax.Array, positions: jax.Array) -> jax.Array:
    q, k, _ = layer_qkv(layer, x, positions)
    return causal_weights(q, k)


def _max_weight_probe(layer: DecoderLayer, x: jax.Array, positions: jax.Array) -> jax.Array:
    q, k, _ = layer_qkv(layer, x, positions)
    return max_causal_weights(q, k)


def max_causal_weights(q: jax.Array, k: jax.Array, block: int = QUERY_BLOCK) -> jax.Array:
    """The largest causal weight of each query: q [B, T, Hq, D], k [B, T, Hkv, D] -> float32
    [B, Hq, T], `block` queries at a time."""
    blocks = [
        jnp.max(causal_weights(q[:, first : first + block], k, first), axis=-1)
        for first in range(0, q.shape[1], block)
    ]
    return jnp.concatenate(blocks, axis=-1)


# ---------------------------------------------------------------------------------------------
# P_sparse


@dataclasses.dataclass(frozen=True)
class SparsityEstimate:
    """P_sparse(L, rho) at one length L, over `sequences` independent sequences."""

    length: int
    rho: float
    mean: float
    stderr: float  # of the mean over sequences; nan for one sequence
    sequences: int
    queries: int  # counted queries per sequence, layer and head
    per_layer: np.ndarray  # [layers]: the same estimate for each layer alone


def p_sparse(
    model: Llama,
    sequences_by_length: Mapping[int, np.ndarray],
    rho: float = 0.01,
    *,
    threshold: str = "context",
    context_fraction: float = 0.5,
    batch_size: int = 4,
) -> dict[int, SparsityEstimate]:
    """P_sparse(L, rho): how often some attention weight of a query exceeds 1 / (L rho).

    The estimator. For a sequence x of length L (one row of `sequences_by_length[L]`, [N, L]),
    layer l, head h and query position i with n_i = i + 1 keys in its causal context, let
    a_{l,h,i,j} (j <= i) be the dense causal softmax weights (`causal_weights`; for a DGA model,
    those of its q and k) and

        tau_i = 1 / (rho * n_i)   (threshold="context", the default)
        tau_i = 1 / (rho * L)     (threshold="length")

    Counted queries: Q = {i : n_i >= max(1, ceil(context_fraction * L))}, by default the
    second half of the sequence (context_fraction=1: the last query only; 0: all queries).
    Per sequence, s(x) = mean over all layers l, all heads h and i in Q of
    1[max_j a_{l,h,i,j} > tau_i]: layers and heads are pooled with equal weight. The estimate
    is the mean of s over the N sequences, its standard error std(s, ddof=1) / sqrt(N):
    sequences are the independent samples (queries and heads of one sequence are not).

    Why these defaults. The paper's L in 1 / (L rho) is the number of tokens a query spreads
    its mass over (1/L is the uniform weight; the event is "some weight is 1/rho times the
    uniform one"). A causal query at i spreads over n_i tokens, so "context" applies the
    paper's rule to each query as it is; for the last query n_i = L and both choices agree.
    With "length", every query with n_i <= rho L passes whatever the model does (its largest
    weight is >= 1/n_i >= 1/(rho L)) and every earlier query is biased upward. Counting only
    the second half keeps P_sparse(L) about contexts of length ~L (all positions would mix in
    short contexts and flatten the dependence on L), and there "length" differs from "context"
    by a factor below 2 in the threshold.

    Returns {L: SparsityEstimate}. `batch_size` rows run at a time.
    """
    _check_sparsity_args(rho, threshold, context_fraction)
    results = {}
    for length, sequences in sorted(sequences_by_length.items()):
        sequences = np.asarray(sequences)
        shape = sequences.shape
        if len(shape) != 2 or shape[1] != length or shape[0] < 1:
            raise ValueError(f"sequences of L={length} must be [N >= 1, {length}], not {shape}")
        max_weights = np.concatenate(
            [
                max_attention_weights(model, sequences[start : start + batch_size])
                for start in range(0, len(sequences), batch_size)
            ],
            axis=1,
        )
        results[length] = sparsity_estimate(max_weights, rho, threshold, context_fraction)
    return results


def sparsity_estimate(
    max_weights: np.ndarray, rho: float, threshold: str = "context", context_fraction: float = 0.5
) -> SparsityEstimate:
    """The `p_sparse` estimate from each query's largest weight [layers, N, H, L]."""
    _check_sparsity_args(rho, threshold, context_fraction)
    _, n, _, length = max_weights.shape
    context = np.arange(1, length + 1)
    tau = 1.0 / (rho * (context if threshold == "context" else np.full(length, length)))
    counted = context >= max(1, math.ceil(context_fraction * length - 1e-9))
    sparse = max_weights[..., counted] > tau[counted]  # [layers, N, H, |Q|]
    per_sequence_layer = sparse.mean(axis=(2, 3)).T  # [N, layers]
    shares = per_sequence_layer.mean(axis=1)  # [N]
    stderr = float(shares.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return SparsityEstimate(
        length=length,
        rho=rho,
        mean=float(shares.mean()),
        stderr=stderr,
        sequences=n,
        queries=int(counted.sum()),
        per_layer=per_sequence_layer.mean(axis=0),
    )


def _check_sparsity_args(rho: float, threshold: str, context_fraction: float) -> None:
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if not 0 <= context_fraction <= 1:
        raise ValueError(f"context_fraction must be in [0, 1], got {context_fraction}")


def plot_p_sparse(
    results: Mapping[int, SparsityEstimate] | Mapping[str, Mapping[int, SparsityEstimate]],
    path: str | Path,
) -> Path:
    """P_sparse against L (log x), mean +- one standard error; `results` is one `p_sparse`
    result or {label: result} for several models or corpora. Writes a PNG; returns its path."""
    single = all(isinstance(key, numbers.Integral) for key in results)
    series = {"P_sparse": results} if single else results
    fig, ax = figure()
    for label, estimates in series.items():
        points = [estimates[length] for length in sorted(estimates)]
        ax.errorbar(
            [p.length for p in points],
            [p.mean for p in points],
            yerr=[0.0 if math.isnan(p.stderr) else p.stderr for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    rho = next(iter(next(iter(series.values())).values())).rho
    lengths = sorted({length for estimates in series.values() for length in estimates})
    ax.set(xscale="log", xlabel="sequence length L", ylabel=f"P_sparse(L, rho={rho:g})")
    ax.set_xticks(lengths, [str(length) for length in lengths], minor=False)
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return Path(save(fig, path))


# ---------------------------------------------------------------------------------------------
# Output KL under input noise


def embedding_rms(model: Llama) -> float:
    """sqrt(mean(E^2)) over the whole embedding table: the scale of relative noise."""
    table = model.embed[...].astype(jnp.float32)
    return float(jnp.sqrt(jnp.mean(table * table)))


def noise_kl(
    model: Llama,
    tokens: np.ndarray,
    sigma: float,
    key: jax.Array,
    *,
    relative: bool = True,
    batch_size: int = 4,
) -> float:
    """Mean KL(p_clean || p_noisy) of the next-token distributions under Gaussian input noise.

    tokens [N, T]: every position of every row is one next-token distribution, all weighted
    equally. The noisy input is the embedding plus i.i.d. N(0, std^2) per coordinate, with
    std = sigma * `embedding_rms(model)` (relative, the default: sigma is a fraction of the
    typical embedding entry, comparable across models) or std = sigma (absolute). The noise is
    drawn from `key` folded with each batch's first row, so two models of the same width given
    the same key and tokens see the same noise: the dense-vs-DGA comparison
    (`compare_noise_kl`) is paired. sigma = 0 gives exactly 0.
    """
    tokens = np.asarray(tokens)
    std = sigma * embedding_rms(model) if relative else sigma
    graphdef, state = nnx.split(model)
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        x = model.embed_tokens(jnp.asarray(tokens[start : start + batch_size]))
        noise = jax.random.normal(jax.random.fold_in(key, start), x.shape, jnp.float32)
        noisy = (x.astype(jnp.float32) + std * noise).astype(x.dtype)
        clean_h, noisy_h = walk_layers(model, x)[0], walk_layers(model, noisy)[0]
        total += float(_kl_sum(graphdef, state, clean_h, noisy_h))
    return total / tokens.size


def compare_noise_kl(
    model: Llama,
    tokens: np.ndarray,
    sigmas: Collection[float],
    key: jax.Array,
    *,
    dga: DGAConfig | None = None,
    relative: bool = True,
    batch_size: int = 4,
) -> dict[str, dict[float, float]]:
    """{"dense": {sigma: KL}, "dga": {sigma: KL}}: `noise_kl` of the model's weights with dense
    attention and with DGA (`dga`, default the model's `config.dga`), on the same noise."""
    variants = {name: with_attention(model, name, dga) for name in ("dense", "dga")}
    return {
        name: {
            sigma: noise_kl(variant, tokens, sigma, key, relative=relative, batch_size=batch_size)
            for sigma in sigmas
        }
        for name, variant in variants.items()
    }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _kl_sum(graphdef, state, clean_h, noisy_h):
    """Sum over positions of KL(p || q) from the last hidden states [B, T, D] of both runs."""
    model = nnx.merge(graphdef, state)
    log_p = jax.nn.log_softmax(model.logits(clean_h), axis=-1)
    log_q = jax.nn.log_softmax(model.logits(noisy_h), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


# ---------------------------------------------------------------------------------------------
# DGA attention mass


def dga_entry_weights(
    q: jax.Array, prefix: Entries, raw: Entries, first: int = 0
) -> tuple[jax.Array, jax.Array]:
    """DGA's softmax weights of queries q [B, C, Hq, D] at positions first..first+C-1 over the
    compressed KV' of `gather_entries` (prefix: focal tokens and groups, with their bias log m;
    raw: non-focal tokens with their [from, until) intervals).

    One softmax per query over every entry it sees (`shared/DGA_SPEC.md`, "What a query sees"),
    in float32 with scale 1/sqrt(D): -> prefix weights [B, Hq, C, NP], raw weights
    [B, Hq, C, NR]. Their products with prefix.v and raw.v sum to `dga_attention`'s output.
    """
    b, c, hq, d = q.shape
    hkv = prefix.k.shape[1]
    scale = _scale(q)
    qg = q.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d)
    t = (first + jnp.arange(c))[:, None]  # [C, 1]

    def logits(entries: Entries, visible: jax.Array) -> jax.Array:  # -> [B, Hkv, G, C, N]
        out = jnp.einsum("bckgd,bknd->bkgcn", qg, entries.k.astype(jnp.float32)) * scale
        if entries.bias is not None:
            out = out + entries.bias[:, :, None, None, :]
        return jnp.where(visible[:, :, None], out, -jnp.inf)

    prefix_visible = prefix.start[:, :, None, :] <= t  # [B, Hkv, C, NP]
    raw_visible = (raw.start[:, :, None, :] <= t) & (t < raw.until[:, :, None, :])
    both = jnp.concatenate([logits(prefix, prefix_visible), logits(raw, raw_visible)], axis=-1)
    weights = jax.nn.softmax(both, axis=-1).reshape(b, hq, c, both.shape[-1])
    n_prefix = prefix.k.shape[2]
    return weights[..., :n_prefix], weights[..., n_prefix:]


def dga_mass_shares(
    model: Llama, tokens: np.ndarray, *, batch_size: int = 4
) -> list[dict[str, float]]:
    """Where a DGA model's attention mass goes: tokens [N, T] -> per layer
    {"focal": x, "group": y, "raw": z}, x + y + z = 1.

    For each query, its DGA weights (`dga_entry_weights`, over the layer's own layout from
    `dga_layout` with the model's `config.dga`) summed over focal tokens, over group entries
    and over raw tokens (the non-focal tokens of its own not-yet-visible group, or chunk under
    streaming selection, and the leftover tokens that never form a group); then averaged over
    every query position 0..T-1, every query head and every row, all weighted equally.
    """
    if model.config.attention != "dga":
        raise ValueError("dga_mass_shares needs a DGA model: see `with_attention`")
    tokens = np.asarray(tokens)
    totals = np.zeros((model.config.num_layers, len(MASS_KINDS)))
    for start in range(0, len(tokens), batch_size):
        batch = jnp.asarray(tokens[start : start + batch_size])
        _, outs = walk_layers(model, model.embed_tokens(batch), _mass_probe)
        totals += np.stack([np.asarray(out, np.float64) for out in outs])
    totals /= totals.sum(axis=1, keepdims=True)
    return [dict(zip(MASS_KINDS, map(float, row), strict=True)) for row in totals]


def _mass_probe(layer: DecoderLayer, x: jax.Array, positions: jax.Array) -> jax.Array:
    q, k, v = layer_qkv(layer, x, positions)
    return dga_mass(q, k, v, layer.attn.config.dga)


def dga_mass(
    q: jax.Array, k: jax.Array, v: jax.Array, dga: DGAConfig, block: int = QUERY_BLOCK
) -> jax.Array:
    """DGA weights of q [B, T, Hq, D] over the KV' of k, v [B, T, Hkv, D] (the layout of
    `dga_layout`), summed over queries and heads on focal tokens, groups and raw tokens:
    float32 [3] in `MASS_KINDS` order, adding up to B * Hq * T. `block` queries at a time."""
    layout = dga_layout(q, k, dga, _scale(q))
    prefix, raw = gather_entries(layout, k, v)
    hq, hkv = q.shape[2], k.shape[2]
    is_group = jnp.repeat(layout.prefix_is_group, hq // hkv, axis=1)[:, :, None, :]  # [B,H,1,NP]
    total = jnp.zeros(len(MASS_KINDS), jnp.float32)
    for first in range(0, q.shape[1], block):
        prefix_w, raw_w = dga_entry_weights(q[:, first : first + block], prefix, raw, first)
        focal = jnp.sum(jnp.where(is_group, 0.0, prefix_w))
        group = jnp.sum(jnp.where(is_group, prefix_w, 0.0))
        total = total + jnp.stack([focal, group, jnp.sum(raw_w)])
    return total


def plot_mass_shares(shares: list[dict[str, float]], path: str | Path) -> Path:
    """Stacked bars per layer of the focal, group and raw shares (`dga_mass_shares`)."""
    fig, ax = figure()
    layers = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for kind in MASS_KINDS:
        heights = np.array([layer[kind] for layer in shares])
        ax.bar(layers, heights, bottom=bottom, label=kind)
        bottom += heights
    ax.set(xlabel="layer", ylabel="share of attention mass", xticks=layers)
    ax.set_ylim(0, 1)
    ax.legend()
    return Path(save(fig, path))


# ---------------------------------------------------------------------------------------------
# Which tokens DGA keeps


def token_roles(
    q: jax.Array,
    k: jax.Array,
    dga: DGAConfig,
    *,
    query: int = -1,
    batch: int = 0,
    head: int = 0,
) -> np.ndarray:
    """What query position `query` (-1: the last) of row `batch` sees of each key position under
    DGA, in KV head `head`: int8 [L], an index into `MASS_KINDS` ("focal": the token itself,
    kept for every later query; "group": folded into its group's weighted entry; "raw": the
    token itself, as a member of the query's own unfinished group or chunk, or a leftover), or
    -1 for a position the query does not see (after it). q [B, L, Hq, D], k [B, L, Hkv, D].
    """
    layout = dga_layout(q, k, dga, _scale(q))
    seq_len, m = q.shape[1], layout.sizes.group_size
    t = range(seq_len)[query]
    src, is_group, start = (
        np.asarray(x[batch, head])
        for x in (layout.prefix_src, layout.prefix_is_group, layout.prefix_from)
    )
    raw_pos, raw_until = (np.asarray(x[batch, head]) for x in (layout.raw_pos, layout.raw_until))
    roles = np.full(seq_len, -1, np.int8)
    seen = start <= t
    roles[src[seen & ~is_group]] = MASS_KINDS.index("focal")
    for group in src[seen & is_group]:
        roles[raw_pos[group * m : (group + 1) * m]] = MASS_KINDS.index("group")
    raw_seen = (raw_pos <= t) & (t < raw_until)
    roles[raw_pos[raw_seen]] = MASS_KINDS.index("raw")
    return roles


def plot_token_roles(roles: np.ndarray, path: str | Path) -> Path:
    """`token_roles` as one colored strip per kind over key positions. Writes a PNG."""
    fig, ax = figure((8, 2.6))
    positions = np.arange(len(roles))
    for index, kind in enumerate(MASS_KINDS):
        where = positions[roles == index]
        ax.scatter(where, np.full(len(where), index), s=40, marker="|", label=kind)
    ax.set(xlabel="key position", yticks=range(len(MASS_KINDS)), yticklabels=MASS_KINDS)
    ax.set_ylim(-0.5, len(MASS_KINDS) - 0.5)
    seen = positions[roles >= 0]
    counts = ", ".join(f"{(roles == i).sum()} {kind}" for i, kind in enumerate(MASS_KINDS))
    ax.set_title(f"what the query at position {seen.max()} sees: {counts}")
    return Path(save(fig, path))
