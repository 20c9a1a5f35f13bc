"""Where DGA's attention mass goes in a `Llama` (`docs/EVAL_NOTES.md`): DGA's softmax weights
over the compressed KV' of the spec (`dga_entry_weights`), their shares on focal tokens, group
entries and raw tokens per layer (`dga_mass_shares`), and what a query sees of each key position
(`token_roles`).

The layers run one by one with probes as for the dense analyses (`layerwise.walk_layers`,
`analysis.py`); the weights are computed in float32 with the model's scale 1/sqrt(head_dim),
`QUERY_BLOCK` queries at a time.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.eval.layerwise import QUERY_BLOCK, layer_qkv, logit_scale, token_rows, walk_layers
from dga_jax.eval.plots import figure, save
from dga_jax.model.llama import DecoderLayer, Llama
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.intervals import Entries

MASS_KINDS = ("focal", "group", "raw")


# ---------------------------------------------------------------------------------------------
# DGA attention mass


def dga_entry_weights(
    q: jax.Array, prefix: Entries, raw: Entries, first: int = 0
) -> tuple[jax.Array, jax.Array]:
    """DGA's softmax weights of queries q [B, C, Hq, D] at positions first..first+C-1 over the
    compressed KV' of `gather_entries` (prefix: focal tokens and groups, with their bias log m;
    raw: non-focal tokens with their [from, until) intervals).

    One softmax per query over every entry it sees (`docs/DGA_SPEC.md`, "What a query sees"),
    in float32 with scale 1/sqrt(D): -> prefix weights [B, Hq, C, NP], raw weights
    [B, Hq, C, NR]. Their products with prefix.v and raw.v sum to `dga_attention`'s output.
    """
    b, c, hq, d = q.shape
    hkv = prefix.k.shape[1]
    scale = logit_scale(q)
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
    tokens = token_rows(tokens, batch_size, vocab_size=model.config.vocab_size)
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
    layout = dga_layout(q, k, dga, logit_scale(q))
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
    if not shares:
        raise ValueError("plot_mass_shares needs the shares of one layer or more, got none")
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
    `query`, `batch` and `head` count from the end when negative; one out of range is an error
    (an array index would clamp it: another head's or row's roles, silently).
    """
    for name, index, size, what in (
        ("query", query, q.shape[1], "positions"),
        ("batch", batch, k.shape[0], "rows"),
        ("head", head, k.shape[2], "KV heads"),
    ):
        if not -size <= index < size:
            raise ValueError(f"{name}={index} is out of range: k has {size} {what} (0..{size - 1})")
    layout = dga_layout(q, k, dga, logit_scale(q))
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
    roles = np.asarray(roles)
    if roles.ndim != 1 or not (roles >= 0).any():
        raise ValueError(
            f"roles must be `token_roles` of one query: [L] with a position it sees (>= 0), "
            f"got shape {roles.shape} with {int((roles >= 0).sum())} seen"
        )
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
