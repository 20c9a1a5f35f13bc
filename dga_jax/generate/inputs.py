"""What generation checks before any work: the prompts, the options, the sizes of a batch.

`Buckets` rounds prompt and cache lengths up so that batches share their compiles;
`batch_sizes` gives a batch's prompt width and cache length and checks that the model's
positions (`check_context`) and the cache (`check_fits`) hold them.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Iterable, Sequence

import numpy as np

from dga_jax.model.config import ModelConfig
from dga_jax.ops.checks import is_int
from dga_jax.ops.dga.capacity import check_fits

GROWTHS = ("pow2", "linear", "exact")


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The lengths prompts and caches are padded up to: `minimum` and its doublings ("pow2"),
    the multiples of `minimum` ("linear"), or every length as it is ("exact": one compile per
    length, as without buckets)."""

    minimum: int = 128
    growth: str = "pow2"

    def __post_init__(self):
        if not is_int(self.minimum) or self.minimum < 1:
            raise ValueError(f"Buckets.minimum must be an int >= 1, got {self.minimum!r}")
        if self.growth not in GROWTHS:
            raise ValueError(f"Buckets.growth must be one of {GROWTHS}, got {self.growth!r}")

    def round_up(self, n: int) -> int:
        """The smallest bucket >= n."""
        if self.growth == "exact":
            return int(n)
        if self.growth == "linear":
            return max(1, -(-int(n) // self.minimum)) * self.minimum
        size = self.minimum
        while size < n:
            size *= 2
        return size


def check_options(max_new_tokens: int, seed: int, max_len: int | None, buckets: Buckets) -> None:
    """Raises, naming the argument, for a value that would otherwise fail inside JAX (a seed
    that is not an int64), or be taken for another (max_len=0 for the default)."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not is_int(seed) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an int in [-2**63, 2**63), got {seed!r}")
    if max_len is not None and (not is_int(max_len) or max_len < 1):
        raise ValueError(f"max_len must be an int >= 1 or None, got {max_len!r}")
    if not isinstance(buckets, Buckets):
        raise ValueError(f"buckets must be a Buckets, e.g. Buckets(128), got {buckets!r}")


def stop_ids(stop_tokens: Sequence[int]) -> tuple[int, ...]:
    """stop_tokens as a tuple; a bare id (stop_tokens=2) or None is an error, not a TypeError."""
    if isinstance(stop_tokens, str) or not isinstance(stop_tokens, Iterable):
        raise ValueError(f"stop_tokens must be a sequence of token ids, got {stop_tokens!r}")
    return tuple(stop_tokens)


def end_ids(
    config: ModelConfig, eos_id: int | None, stop_tokens: Sequence[int] = ()
) -> tuple[int, ...]:
    """The ids a completion ends at, as Hugging Face's `generate` stops: the tokenizer's EOS
    (`eos_id`, None: none), then `stop_tokens` where any are given, else the checkpoint's
    `eos_token_ids` inside the vocabulary (others can never be chosen), which take in
    generation_config.json's: Llama-3-Instruct ends a turn with <|eot_id|>, not its tokenizer's
    <|end_of_text|>. A list of stops given to `generate` replaces generation_config's, as
    LongBench's pred.py's [EOS, newline] does."""
    own = [i for i in config.eos_token_ids or () if 0 <= i < config.vocab_size]
    ids = ([] if eos_id is None else [eos_id]) + (list(stop_tokens) or own)
    return tuple(dict.fromkeys(ids))


def batch_sizes(config, longest, max_new_tokens, max_len, buckets) -> tuple[int, int]:
    """(prompt width, max_len) of a batch whose longest prompt has `longest` tokens, both
    checked (`check_context`, `check_fits`): see `stream`."""
    check_context(config, longest, max_new_tokens)
    width = buckets.round_up(longest)
    if max_len is None:
        max_len = width + buckets.round_up(max_new_tokens)
    check_fits(longest + max_new_tokens - 1, max_len)  # the last token is not fed
    return min(width, max_len), max_len


def check_context(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Raises if decoding a prompt of `prompt_len` tokens for `max_new_tokens` would feed the
    model a position past its `max_position` (it reads positions 0 .. prompt_len +
    max_new_tokens - 2: the last new token is not fed). RoPE has no table to run out of: past
    its context a model would extrapolate silently. StreamingLLM, LM-Infinite and a sliding
    window within max_position bound every RoPE distance by their window, which is what lets
    them stream on: they are not limited (`ModelConfig.positions_fit`)."""
    if config.positions_fit(prompt_len + max_new_tokens - 1):
        return
    raise ValueError(
        f"a prompt of {prompt_len} tokens and max_new_tokens={max_new_tokens} need "
        f"{prompt_len + max_new_tokens - 1} positions, past the model's "
        f"max_position={config.max_position}: shorten the prompt, lower max_new_tokens or raise "
        "max_position (e.g. load_model(..., max_position=N)) to extrapolate knowingly"
    )


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (right-padded tokens [B, T] int32, lengths [B]); empty prompts, ids that
    are not ints and ids outside [0, vocab_size) rejected (the embedding lookup would clamp
    them silently, a float id was cut to an int)."""
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a sequence of token-id sequences, got {prompts!r}")
    rows = [_prompt_ids(i, prompt, vocab_size) for i, prompt in enumerate(prompts)]
    if not rows:
        raise ValueError("no prompts given")
    lengths = np.array([len(row) for row in rows])
    tokens = np.zeros((len(rows), lengths.max()), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens, lengths


def _prompt_ids(i: int, prompt: Sequence[int], vocab_size: int) -> np.ndarray:
    """Prompt i as its token ids [T], each checked (see `pad_prompts`)."""
    ids = None if isinstance(prompt, str) else np.asarray(prompt)
    if ids is None or ids.ndim != 1:
        raise ValueError(
            f"prompt {i} must be a sequence of token ids, got {reprlib.repr(prompt)} (prompts "
            "holds one per prompt: [[1, 2, 3]] for one; text must be encoded first)"
        )
    if not len(ids):
        raise ValueError(f"prompt {i} is empty: give at least one token")
    bad = _first_non_id(prompt, ids)
    if bad is not None:
        raise ValueError(f"prompt {i} holds {bad[1]!r} at position {bad[0]}: ids are ints")
    outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(outside):
        raise ValueError(
            f"prompt {i} holds token id {ids[outside[0]]} at position {outside[0]}, outside the "
            f"model's vocabulary [0, {vocab_size})"
        )
    return ids


def _first_non_id(prompt: Sequence[int], ids: np.ndarray) -> tuple[int, object] | None:
    """(position, value) of the first entry of `prompt` (as `ids`) that is no int id, or None.

    An array's dtype says it; a list's entries are checked one by one: np.asarray([True, 3]) is
    an int array (True was read as id 1), [3, 4.7] a float one (name 4.7, not 3.0).
    """
    if isinstance(prompt, list | tuple):
        values = prompt
    elif ids.dtype.kind in "iu":
        return None
    else:
        values = ids.tolist()
    return next(((j, t) for j, t in enumerate(values) if not _is_id(t)), None)


def _is_id(token) -> bool:
    """An int (Python or NumPy scalar) or a 0-d integer array, not a bool."""
    if is_int(token):
        return True
    return np.shape(token) == () and np.asarray(token).dtype.kind in "iu"
