"""How many tokens and prefix entries a DGA decoding cache holds: its sizes, fixed by the
longest sequence it is built for, and the checks that a batch fits them.

A row prefilled at P holds `prefill_counts` prefix entries and tail tokens; each flush of m'
tail tokens adds `entries_per_flush` entries (`DGA_SPEC.md`, "Streaming selection and
decoding"). `prefix_capacity` sizes the prefix for rows prefilled at any mix of lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dga_jax.ops.checks import is_int
from dga_jax.ops.dga.config import DGAConfig


def flush_shape(config: DGAConfig) -> tuple[int, int]:
    """(r', m_fold): tail tokens made focal and tail tokens folded into one group per flush.

    gamma >= 1 keeps every token focal: the tail flushes each token straight to the prefix.
    """
    if config.focal_ratio >= 1.0:
        return 1, 0
    return config.chunk_focal, config.group_size


def entries_per_flush(config: DGAConfig) -> int:
    """Prefix entries one flush adds: r' focal tokens and, if anything is folded, one group."""
    focal, fold = flush_shape(config)
    return focal + (fold > 0)


def prefill_counts(config: DGAConfig, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """(prefix entries, tail tokens) after a prefill of `prompt_lengths` tokens (elementwise).

    Global: r = ceil(gamma P) focal and (P - r) // m groups, the (P - r) mod m leftovers in the
    tail; streaming: r' focal and one group per complete chunk of m', the rest in the tail.
    """
    lengths = np.asarray(prompt_lengths, np.int64)
    focal, groups = config.counts(lengths)
    return focal + groups, lengths - focal - groups * config.group_size


def prefix_capacity(config: DGAConfig, max_len: int, prompt_lengths: Sequence[int]) -> int:
    """Prefix slots for rows prefilled at `prompt_lengths` and decoded up to `max_len` tokens.

    A row prefilled at P holds `prefill_counts` entries and tokens; each of the next max_len - P
    tokens joins the tail, and every m'-th flushes `entries_per_flush` entries into the prefix.
    """
    lengths = np.asarray(prompt_lengths)
    integers = np.issubdtype(lengths.dtype, np.integer)  # not floats cut to ints, nor bools
    if lengths.ndim != 1 or not lengths.size or not integers or lengths.min() < 0:
        raise ValueError(
            f"prompt_lengths must be one or more lengths >= 0 (integers), got {prompt_lengths!r}"
        )
    check_fits(int(lengths.max()), max_len)
    focal, fold = flush_shape(config)
    prefix, tail = prefill_counts(config, lengths)
    flushes = (tail + max_len - lengths) // (focal + fold)
    return int(np.max(prefix + flushes * entries_per_flush(config)))


def check_fits(num_tokens: int, max_len: int) -> None:
    """Raises if a cache built for `max_len` tokens would have to hold `num_tokens`."""
    if not is_int(max_len):
        raise ValueError(f"max_len must be an int (tokens the cache holds), got {max_len!r}")
    if num_tokens > max_len:
        raise ValueError(
            f"the KV cache is built for max_len={max_len} tokens but {num_tokens} are needed; "
            "build it with a larger max_len"
        )


def check_capacity(config: DGAConfig, max_len: int, capacity: int, prompt_lengths) -> None:
    """Raises if `capacity` prefix slots cannot hold rows prefilled at `prompt_lengths` and
    decoded up to `max_len` tokens (traced lengths cannot be checked: such a row's outputs turn
    NaN once its prefix overflows, `DGACache.attend`)."""
    lengths = np.asarray(prompt_lengths)
    needed = prefix_capacity(config, max_len, lengths)
    if capacity < needed:
        raise ValueError(
            f"capacity={capacity} prefix slots are too few: prompts of up to {lengths.max()} "
            f"tokens decoded up to max_len={max_len} need {needed}"
        )
