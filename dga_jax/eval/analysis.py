"""The paper's attention analyses on a `Llama`: attention weights, sparsity P_sparse(L, rho) and
output KL under input noise (`docs/EVAL_NOTES.md`); where DGA's attention mass goes is
`dga_analysis.py`.

Everything runs the model's own modules layer by layer (`layerwise.walk_layers`): a probe reads
each layer's input and reduces its T x T weights to a few numbers per query, block of queries by
block, so the estimators hold no layer's full weights.

Attention weights are those of the model's q and k: dense causal softmax over positions
0..t (`causal_weights`), or for DGA the softmax over the compressed KV' of the spec
(`dga_analysis.dga_entry_weights`). They are computed in float32 with the model's scale
1/sqrt(head_dim). Sequences are whole rows at positions 0..T-1 (no padding, no zig-zag split).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Collection, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.eval.layerwise import (
    QUERY_BLOCK,
    check_batch_size,
    layer_qkv,
    logit_scale,
    token_rows,
    walk_layers,
    with_attention,
)
from dga_jax.eval.plots import figure, save
from dga_jax.model.llama import DecoderLayer, Llama
from dga_jax.ops.checks import is_int, is_real
from dga_jax.ops.dga.config import DGAConfig

THRESHOLDS = ("context", "length")


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
    logits = jnp.einsum("bckgd,btkd->bkgct", qg, k.astype(jnp.float32)) * logit_scale(q)
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
    tokens = jnp.asarray(token_rows(tokens, vocab_size=model.config.vocab_size))
    _, outs = walk_layers(model, model.embed_tokens(tokens), _weights_probe, layers)
    return [None if out is None else np.asarray(out) for out in outs]


def max_attention_weights(model: Llama, tokens: jax.Array) -> np.ndarray:
    """The largest causal weight of each query: tokens [B, T] -> float32 [layers, B, H, T]."""
    tokens = jnp.asarray(token_rows(tokens, vocab_size=model.config.vocab_size))
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
    check_batch_size(batch_size)
    bad = [length for length in sequences_by_length if not is_int(length) or length < 1]
    if bad or not sequences_by_length:
        raise ValueError(
            f"sequences_by_length must map one or more lengths L (ints >= 1) to sequences "
            f"[N, L], got keys {list(sequences_by_length)}"
        )
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
    max_weights = np.asarray(max_weights)
    if max_weights.ndim != 4 or 0 in max_weights.shape:
        raise ValueError(
            f"max_weights must be [layers, N, H, L], none empty, not of shape {max_weights.shape}"
        )
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
    empty = [label for label, estimates in series.items() if not estimates] if results else []
    if not results or empty:
        raise ValueError(f"plot_p_sparse needs estimates to plot, got none for {empty or 'any L'}")
    rhos = {p.rho for estimates in series.values() for p in estimates.values()}
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
    rho = f"rho={rhos.pop():g}" if len(rhos) == 1 else "rho"  # several rho: none is the one
    lengths = sorted({length for estimates in series.values() for length in estimates})
    ax.set(xscale="log", xlabel="sequence length L", ylabel=f"P_sparse(L, {rho})")
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
    (`compare_noise_kl`) is paired. sigma (finite, >= 0) = 0 gives exactly 0.
    """
    tokens = token_rows(tokens, batch_size, vocab_size=model.config.vocab_size)
    _check_sigmas([sigma])
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
    _check_sigmas(sigmas)  # before the first model runs, not after the dense half
    variants = {name: with_attention(model, name, dga) for name in ("dense", "dga")}
    return {
        name: {
            sigma: noise_kl(variant, tokens, sigma, key, relative=relative, batch_size=batch_size)
            for sigma in sigmas
        }
        for name, variant in variants.items()
    }


def _check_sigmas(sigmas: Collection[float]) -> None:
    """Noise scales are finite reals >= 0: a negative one draws the same noise distribution as
    its absolute value (a different KL, reported under a sigma that means nothing), a NaN or
    infinite one gives a NaN KL."""
    for sigma in sigmas:
        if not is_real(sigma) or not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be a finite noise scale >= 0, got {sigma!r}")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _kl_sum(graphdef, state, clean_h, noisy_h):
    """Sum over positions of KL(p || q) from the last hidden states [B, T, D] of both runs."""
    model = nnx.merge(graphdef, state)
    log_p = jax.nn.log_softmax(model.logits(clean_h), axis=-1)
    log_q = jax.nn.log_softmax(model.logits(noisy_h), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q))
