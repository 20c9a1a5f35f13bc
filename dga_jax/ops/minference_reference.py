"""MInference's definition in NumPy loops, for tests: the pattern as the reference's
`vertical_and_slash_kernel` estimates it, the mask as its `convert_vertical_slash_indexes` walks
it, line for line. `dga_jax.ops.minference` is the implementation they check.
"""

from __future__ import annotations

import numpy as np

from dga_jax.ops.minference import (
    BLOCK,
    FORCED_COLUMNS,
    FORCED_DIAGONALS,
    LAST_Q,
    MInferenceConfig,
)


def minference_reference(q, k, v, config: MInferenceConfig, lengths=None) -> np.ndarray:
    """The definition, in NumPy loops written after the reference: every row alone (its first
    lengths[b] tokens), every query head; the pattern as `vertical_and_slash_kernel` estimates
    it, the mask as `convert_vertical_slash_indexes` walks it. -> [B, L, Hq, D] float64,
    zero past each row's length."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, seq_len, hq, d = q.shape
    groups = hq // k.shape[2]
    lengths = np.full(b, seq_len) if lengths is None else np.asarray(lengths)
    out = np.zeros(q.shape)
    for row in range(b):
        n = int(lengths[row])
        for h in range(hq):
            qh, kh, vh = q[row, :n, h], k[row, :n, h // groups], v[row, :n, h // groups]
            columns, offsets = reference_pattern(qh, kh, config)
            s = np.where(reference_mask(columns, offsets, n), qh @ kh.T * d**-0.5, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            out[row, :n, h] = p / p.sum(axis=-1, keepdims=True) @ vh
    return out


def reference_pattern(q: np.ndarray, k: np.ndarray, config: MInferenceConfig):
    """One head of one row, q, k [n, D] -> (columns ascending, offsets descending), after
    `vertical_and_slash_kernel` (ties to the lower index, as `estimate_pattern`)."""
    n, last = q.shape[0], min(LAST_Q, q.shape[0])
    t = np.arange(n - last, n)[:, None]
    s = np.where(np.arange(n) <= t, q[-last:] @ k.T * q.shape[1] ** -0.5, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    vertical = p.sum(axis=0)
    vertical[:FORCED_COLUMNS] = np.inf
    slash = np.zeros(n)
    for r in range(last):
        for j in range(int(t[r, 0]) + 1):
            slash[t[r, 0] - j] += p[r, j]
    slash[:FORCED_DIAGONALS] = np.inf
    n_vertical, n_slash = config.counts(n)
    columns = np.sort(np.argsort(-vertical, kind="stable")[:n_vertical])
    offsets = np.sort(np.argsort(-slash, kind="stable")[:n_slash])[::-1]
    return columns, offsets


def reference_mask(columns: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """[n, n] visibility: the CUDA index builder's loop, line for line, per row block."""
    mask = np.zeros((n, n), bool)
    for start_m in range(0, n, BLOCK):
        end_m = start_m + BLOCK
        blocks, cols = [], []
        v, s = 1, 1
        v_idx, s_idx = columns[0], offsets[0]
        while s_idx >= end_m:
            s_idx, s = offsets[s], s + 1
        s_idx = max(end_m - s_idx, BLOCK)
        range_start, range_end = s_idx - BLOCK, s_idx
        while True:
            if v_idx < range_end:
                if v_idx < range_start:
                    cols.append(v_idx)
                v_idx, v = (columns[v], v + 1) if v < len(columns) else (end_m + BLOCK, v)
                continue
            if s >= len(offsets):
                blocks.extend(range(range_start, range_end))
                break
            s_idx, s = max(end_m - offsets[s], BLOCK), s + 1
            if s_idx > range_end + BLOCK:
                blocks.extend(range(range_start, range_end))
                range_start, range_end = s_idx - BLOCK, s_idx
            elif s_idx > range_end:
                range_end += BLOCK
        keys = np.zeros(n + 2 * BLOCK, bool)
        keys[blocks + cols] = True
        mask[start_m:end_m] = keys[:n]
    return mask & np.tri(n, dtype=bool)
