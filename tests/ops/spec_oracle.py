"""DGA read straight from `docs/DGA_SPEC.md`, in float64 NumPy, one query at a time: a second,
independent reading of the contract that checks `implementation="reference"` itself (every
other implementation is tested against the reference). O(L^2) and slow: tiny shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def spec_attention(q, k, v, m: int, gamma: float, selection: str = "global", scale=None):
    """q [B, L, Hq, D], k, v [B, L, Hkv, D] -> [B, L, Hq, D] float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, seq_len, hq, d = q.shape
    groups = hq // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    rule = _global if selection == "global" else _streaming
    out = np.zeros(q.shape)
    for row in range(b):
        for h in range(k.shape[2]):
            heads = slice(h * groups, (h + 1) * groups)
            out[row, :, heads] = rule(q[row, :, heads], k[row, :, h], v[row, :, h], m, gamma, scale)
    return out


def _ceil(x: float) -> int:
    """The spec's ceiling in exact arithmetic: 0.1 * 30 = 3.0000000000000004 adds no token."""
    return math.ceil(x - 1e-6)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attend(q_scaled, entries):
    """One softmax over the visible entries (k, v, bias) of one query [G, D]."""
    keys, values, bias = (np.array([e[i] for e in entries]) for i in range(3))
    return _softmax(q_scaled @ keys.T + bias) @ values


def _global(q, k, v, m, gamma, scale):
    """One KV head: q [L, G, D], k, v [L, D]. Steps 1-4 of "Global selection", then "What a
    query sees" by each entry's visibility interval [from, until)."""
    seq_len = q.shape[0]
    sampled = sorted(set(range(m - 1, seq_len, m)) | {seq_len - 1})
    s = np.zeros(seq_len)
    for j in sampled:
        for g in range(q.shape[1]):
            s[: j + 1] += _softmax(q[j, g] @ k[: j + 1].T * scale)
    r = min(seq_len, _ceil(gamma * seq_len))
    focal = set(sorted(range(seq_len), key=lambda i: (-s[i], i))[:r])
    rest = [i for i in range(seq_len) if i not in focal]
    grouped = [rest[i * m : (i + 1) * m] for i in range(len(rest) // m)]
    entries = [(k[p], v[p], 0.0, p, math.inf) for p in sorted(focal)]  # (k, v, bias, from, until)
    last_of = {}
    for members in grouped:
        total = s[members].sum()
        w = s[members] / total if total > 0 else np.full(m, 1 / m)
        entries.append((w @ k[members], w @ v[members], math.log(m), members[-1], math.inf))
        last_of.update((p, members[-1]) for p in members)
    entries += [(k[p], v[p], 0.0, p, last_of.get(p, math.inf)) for p in rest]
    return np.stack(
        [_attend(q[t] * scale, [e for e in entries if e[3] <= t < e[4]]) for t in range(seq_len)]
    )


def _streaming(q, k, v, m, gamma, scale):
    """One KV head, by "Streaming selection and decoding": each token attends to the focal and
    group entries so far and the raw tail, then a full tail of m' tokens is flushed."""
    if gamma >= 1:
        kept, folded = 1, 0  # no grouping: every token becomes focal
    else:
        kept, folded = (0 if gamma == 0 else _ceil(gamma * m / (1 - gamma))), m
    entries, tail, out = [], [], []
    for t in range(q.shape[0]):
        tail.append(t)
        out.append(_attend(q[t] * scale, entries + [(k[i], v[i], 0.0) for i in tail]))
        if len(tail) < kept + folded:
            continue
        score = sum(_softmax(q[t, g] @ k[tail].T * scale) for g in range(q.shape[1]))
        chosen = sorted(sorted(range(len(tail)), key=lambda i: (-score[i], i))[:kept])
        entries += [(k[tail[i]], v[tail[i]], 0.0) for i in chosen]
        others = [i for i in range(len(tail)) if i not in chosen]
        if others:
            total = score[others].sum()
            w = score[others] / total if total > 0 else np.full(len(others), 1 / len(others))
            members = [tail[i] for i in others]
            entries.append((w @ k[members], w @ v[members], math.log(folded)))
        tail = []
    return np.stack(out)
