"""The definition of DGA attention: O(L^2) time and memory, for tests and small inputs.

Written straight from `docs/DGA_SPEC.md` and independent of `layout.py` and `selection.py`,
so that they can check each other: every raw token is an entry, every complete group is one
more entry, and a dense [L, L + groups] visibility mask says who sees what. Everything is
computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.dga.config import DGAConfig, LayoutSizes


def dga_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, config: DGAConfig, scale: float
) -> jax.Array:
    """DGA attention by its definition. q: [B, L, Hq, D], k/v: [B, L, Hkv, D] -> [B, L, Hq, D]."""
    b, seq_len, hq, d = q.shape
    hkv = k.shape[2]
    # [B, Hkv, L, G, D] queries, [B, Hkv, L, D] keys and values: one layout per KV head.
    qh = q.astype(jnp.float32).reshape(b, seq_len, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
    kh = k.astype(jnp.float32).transpose(0, 2, 1, 3)
    vh = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    sizes = config.sizes(seq_len)

    def one_head(qh, kh, vh):
        return _attend_one_head(qh, kh, vh, config, sizes, scale)

    out = jax.vmap(jax.vmap(one_head))(qh, kh, vh)  # [B, Hkv, L, G, D]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, seq_len, hq, d).astype(q.dtype)


def _attend_one_head(q, k, v, config: DGAConfig, sizes: LayoutSizes, scale: float):
    """q: [L, G, D], k/v: [L, D] -> [L, G, D]."""
    seq_len, m = sizes.seq_len, sizes.group_size
    products = jnp.einsum("tgd,sd->gts", q, k)  # [G, L, L]
    logits = products * scale
    focal, score = _select(jax.lax.stop_gradient(products), scale, config, sizes)

    # Non-focal tokens, in position order, are cut into groups of m; the rest stay raw.
    nonfocal = ~focal
    group = jnp.where(nonfocal, (jnp.cumsum(nonfocal) - 1) // m, -1)  # [L]
    in_group = nonfocal & (group < sizes.num_groups)
    members = group[None, :] == jnp.arange(sizes.num_groups)[:, None]  # [NG, L]
    if sizes.chunk:  # streaming: a group appears after its chunk's last query
        group_from = (jnp.arange(sizes.num_groups) + 1) * sizes.chunk
    else:  # global: a group appears at its last member
        group_from = jnp.max(jnp.where(members, jnp.arange(seq_len), -1), axis=1)

    w = jnp.where(members, score[None, :], 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = jax.lax.stop_gradient(
        jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), members / m)
    )
    group_k, group_v = w @ k, w @ v  # [NG, D]

    t = jnp.arange(seq_len)[:, None]
    # A grouped token stays visible until its group appears; focal and leftover tokens for ever.
    until = jnp.append(group_from, seq_len)[jnp.where(in_group, group, sizes.num_groups)]  # [L]
    token_visible = (jnp.arange(seq_len)[None, :] <= t) & (t < until[None, :])  # [L, L]
    group_visible = group_from[None, :] <= t  # [L, NG]

    group_logits = jnp.einsum("tgd,nd->gtn", q, group_k) * scale + math.log(m)
    all_logits = jnp.concatenate([logits, group_logits], axis=-1)  # [G, L, L + NG]
    visible = jnp.concatenate([token_visible, group_visible], axis=-1)
    probs = jax.nn.softmax(jnp.where(visible[None], all_logits, -jnp.inf), axis=-1)
    out = probs @ jnp.concatenate([v, group_v], axis=0)  # [G, L, D]
    return out.transpose(1, 0, 2)


def _select(products, scale: float, config: DGAConfig, sizes: LayoutSizes):
    """Focal mask [L] and the per-token scores [L] that weight group members, from the
    products q . k [G, L, L] (logits before `scale`)."""
    seq_len = sizes.seq_len
    if sizes.num_focal == seq_len:
        return jnp.ones(seq_len, bool), jnp.ones(seq_len, jnp.float32)
    if config.selection == "global":
        return _select_global(products, scale, sizes)
    return _select_streaming(products, scale, sizes)


def _softmax(products, scale: float):
    """softmax(products * scale) over the last axis as exp((x - max) * scale) / sum: the
    largest product's numerator is exactly 1 under any fusion (ties stay ties)."""
    e = jnp.exp((products - jnp.max(products, axis=-1, keepdims=True)) * scale)
    return e / e.sum(axis=-1, keepdims=True)


def _select_global(products, scale: float, sizes: LayoutSizes):
    seq_len, m = sizes.seq_len, sizes.group_size
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    probs = _softmax(jnp.where(causal, products, -jnp.inf), scale)  # [G, L, L]
    sampled = np.unique(np.minimum(np.arange(m - 1, seq_len + m - 1, m), seq_len - 1))
    importance = probs[:, sampled, :].sum(axis=(0, 1))  # [L]; causal mask gives j >= i
    order = jnp.argsort(-importance, stable=True)  # ties: lower position first
    focal = jnp.zeros(seq_len, bool).at[order[: sizes.num_focal]].set(True)
    return focal, importance


def _select_streaming(products, scale: float, sizes: LayoutSizes):
    seq_len, chunk = sizes.seq_len, sizes.chunk
    per_chunk = sizes.num_focal // max(sizes.num_groups, 1)
    focal = jnp.zeros(seq_len, bool)
    score = jnp.zeros(seq_len, jnp.float32)
    for c in range(sizes.num_groups):
        start, last = c * chunk, (c + 1) * chunk - 1
        chunk_score = _softmax(products[:, last, start : last + 1], scale).sum(axis=0)
        order = jnp.argsort(-chunk_score, stable=True)
        focal = focal.at[start + order[:per_chunk]].set(True)
        score = score.at[start : last + 1].set(chunk_score)
    return focal, score


def dga_decode_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, config: DGAConfig, scale: float, prompt_len: int
) -> np.ndarray:
    """Outputs [B, L - P, Hq, D] of tokens P..L-1 decoded one by one after a prefill of P.

    q: [B, L, Hq, D], k/v: [B, L, Hkv, D]. Written from the spec's decoding rule in NumPy
    float32, one token, one (batch, KV head) at a time. A `global` prefill starts from the
    prompt's focal set, groups and leftovers; `streaming` decodes every token from position 0.
    """
    b, seq_len, hq, d = q.shape
    hkv = k.shape[2]
    qh = np.asarray(q, np.float32).reshape(b, seq_len, hkv, hq // hkv, d)
    kh, vh = np.asarray(k, np.float32), np.asarray(v, np.float32)
    out = np.zeros((b, seq_len - prompt_len, hkv, hq // hkv, d), np.float32)
    start = prompt_len if config.selection == "global" else 0
    for i in range(b):
        for h in range(hkv):
            q_bh, k_bh, v_bh = qh[i, :, h], kh[i, :, h], vh[i, :, h]
            state = _prefill_entries(q_bh[:start], k_bh[:start], v_bh[:start], config, scale)
            for t in range(start, seq_len):
                o = _decode_token(state, q_bh[t], k_bh[t], v_bh[t], config, scale)
                if t >= prompt_len:
                    out[i, t - prompt_len, h] = o
    return out.reshape(b, seq_len - prompt_len, hq, d)


def _prefill_entries(q, k, v, config: DGAConfig, scale: float) -> dict:
    """Entries (k, v, bias) and raw tail indices after a global prefill. q [P, G, D], k/v [P, D]."""
    prompt_len, m = k.shape[0], config.group_size
    state = {"k": [], "v": [], "bias": [], "tail": [], "keys": k, "values": v}
    if prompt_len == 0:
        return state
    if config.focal_ratio >= 1.0:
        state.update(k=list(k), v=list(v), bias=[0.0] * prompt_len)
        return state
    sampled = set(range(m - 1, prompt_len, m)) | {prompt_len - 1}
    importance = np.zeros(prompt_len, np.float32)
    for j in sampled:
        logits = np.einsum("gd,sd->gs", q[j], k[: j + 1]) * scale
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        importance[: j + 1] += (p / p.sum(axis=-1, keepdims=True)).sum(axis=0)
    r = min(prompt_len, math.ceil(config.focal_ratio * prompt_len - 1e-6))
    focal = np.sort(np.argsort(-importance, kind="stable")[:r])  # ties: lower position
    rest = [i for i in range(prompt_len) if i not in set(focal.tolist())]
    cut = len(rest) // m * m
    for i in focal:
        _add_entry(state, k[i], v[i], 0.0)
    for g in range(0, cut, m):
        _add_group(state, rest[g : g + m], importance[rest[g : g + m]], m)
    state["tail"] = rest[cut:]
    return state


def _decode_token(state: dict, q, k, v, config: DGAConfig, scale: float) -> np.ndarray:
    """Appends token (q [G, D], k/v [D]) and returns its output [G, D]; flushes a full tail."""
    t = len(state["keys"])
    state["keys"] = np.concatenate([state["keys"], k[None]])
    state["values"] = np.concatenate([state["values"], v[None]])
    state["tail"].append(t)
    tail = state["tail"]
    keys = np.array(state["k"] + [state["keys"][i] for i in tail]).reshape(-1, k.shape[0])
    values = np.array(state["v"] + [state["values"][i] for i in tail]).reshape(-1, k.shape[0])
    bias = np.array(state["bias"] + [0.0] * len(tail), np.float32)
    logits = np.einsum("gd,nd->gn", q, keys) * scale + bias
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    out = (p / p.sum(axis=-1, keepdims=True)) @ values
    if config.focal_ratio >= 1.0:
        focal, m = 1, 0
    else:
        focal, m = config.chunk_focal, config.group_size
    if len(tail) == focal + m:
        tail_logits = np.einsum("gd,nd->gn", q, state["keys"][tail]) * scale
        e = np.exp(tail_logits - tail_logits.max(axis=-1, keepdims=True))
        score = (e / e.sum(axis=-1, keepdims=True)).sum(axis=0)
        chosen = np.sort(np.argsort(-score, kind="stable")[:focal]).tolist()
        for i in chosen:
            _add_entry(state, state["keys"][tail[i]], state["values"][tail[i]], 0.0)
        others = [i for i in range(len(tail)) if i not in chosen]
        if others:
            _add_group(state, [tail[i] for i in others], score[others], m)
        state["tail"] = []
    return out


def _add_entry(state: dict, k, v, bias: float) -> None:
    state["k"].append(k)
    state["v"].append(v)
    state["bias"].append(bias)


def _add_group(state: dict, members: list[int], scores, m: int) -> None:
    """One group entry: members weighted ∝ scores (uniform 1/m if they sum to 0), bias log m."""
    total = float(np.sum(scores))
    w = np.asarray(scores, np.float32) / total if total > 0 else np.full(m, 1.0 / m, np.float32)
    keys, values = state["keys"][members], state["values"][members]
    _add_entry(state, w @ keys, w @ values, math.log(m))
