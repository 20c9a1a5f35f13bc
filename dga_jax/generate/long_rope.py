"""LongRoPE's switch to the long factors in decoding, as transformers' Phi-3 `generate` makes it.

LongRoPE rotates a sequence of up to `original_max_position` tokens with its short factors and a
longer one with its long factors (`RopeScaling`), each row by its own length. Cached decoding
rotates each new token at the length it reaches, so a prompt shorter than the original context
decoded past it would keep short-factor keys beside long-factor queries. transformers' Phi-3
(`Phi3ForCausalLM.prepare_inputs_for_generation`; Phi-3.5 and Phi-4-mini are Phi-3s) drops its
cache once, at the token that first takes a sequence past the original context, and runs the
whole sequence again: from then on every key has the long factors. `generate` does the same
per row: the step that feeds a row's token at position `original_max_position` re-prefills
that row (`Switch`); so every step's logits are those of the whole sequence's forward, before
the switch and after it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dga_jax.model.config import ModelConfig


def switch_position(config: ModelConfig, lengths: np.ndarray, max_new_tokens: int) -> int | None:
    """The position whose token makes decoding re-prefill its row (LongRoPE's original context),
    or None where no row of prompt `lengths` [B] feeds it within `max_new_tokens` (decoding
    feeds positions lengths .. lengths + max_new_tokens - 2), or the RoPE is another."""
    if config.rope_scaling.kind != "longrope":
        return None
    position = config.rope_scaling.original_max_position
    reached = (lengths <= position) & (position <= lengths + max_new_tokens - 2)
    return position if reached.any() else None


class Switch:
    """Each row's tokens so far, and which rows switch at a step (`switch_position`).

    tokens: the right-padded prompts [B, T] with `lengths` [B]; `stream`'s step s samples each
    row's token at position lengths + s and (s >= 1) feeds the one at lengths + s - 1.
    """

    def __init__(self, position: int, tokens: np.ndarray, lengths: np.ndarray, max_len: int):
        self.position = position
        self.lengths = np.asarray(lengths)
        self.history = np.zeros((len(tokens), max_len + 1), np.int32)  # + the last, unfed token
        self.history[:, : tokens.shape[1]] = tokens

    def record(self, step: int, tokens: np.ndarray) -> None:
        """The tokens [B] sampled at `step`."""
        self.history[np.arange(len(tokens)), self.lengths + step] = tokens

    def rows(self, step: int, active: np.ndarray) -> np.ndarray:
        """The active rows whose token fed at `step` (>= 1) sits at the switch position: rows
        prefilled longer than it rotated with the long factors from the start."""
        return np.flatnonzero((self.lengths + step - 1 == self.position) & active)

    def prompts(self, rows: np.ndarray, width: int) -> np.ndarray:
        """[len(rows), width]: those rows' tokens up to the switch position's, included, then
        padding (width > position: a width the sequence split divides, as the batch's)."""
        prompts = np.zeros((len(rows), width), np.int32)
        prompts[:, : self.position + 1] = self.history[rows, : self.position + 1]
        return prompts


@functools.partial(jax.jit, donate_argnames="caches")
def set_rows(logits: jax.Array, caches, rows: jax.Array, new_logits: jax.Array, new_caches):
    """Logits [B, V] and caches (leaves [layers, B, ...]) with `rows` replaced by a prefill's."""
    caches = jax.tree.map(lambda c, n: c.at[:, rows].set(n), caches, new_caches)
    return logits.at[rows].set(new_logits), caches
