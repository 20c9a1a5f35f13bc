"""What every evaluation runs on: a tokenizer, greedy generation and per-token log-probs.

Tasks see a model only through an `Engine`, so the scoring is tested with oracle engines and a
Hugging Face model can be wrapped to compare with. `ModelEngine` is the one for our `Llama`:
batched, bucketed generation (`dga_jax.completions`) and batched scoring, both under the mesh
the model was loaded on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.data.tokenizers import Tokenizer
from dga_jax.generate import Buckets, completions, pad_prompts
from dga_jax.generate.inputs import end_ids
from dga_jax.model.config import ModelConfig
from dga_jax.model.llama import Llama, cross_entropy
from dga_jax.ops.checks import is_int
from dga_jax.ops.dga.sharded import shard_count


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """How a model scores a sequence ids[0..n-1], one entry per predicted token t = 1..n-1."""

    logprobs: np.ndarray  # [n - 1] float64: log p(ids[t] | ids[:t])
    greedy: np.ndarray  # [n - 1] bool: ids[t] is the most likely token there


class Engine(Protocol):
    """A model as the tasks use it."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_length(self) -> int:
        """The most tokens (prompt and generated together) one sequence may hold."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_tokens: Sequence[int] = (),
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Greedy continuations of token-id prompts, each ending before the tokenizer's EOS or
        one of `stop_tokens` (none given: the checkpoint's eos ids, `generate.inputs.end_ids`)
        or after `max_new_tokens` tokens (the stop excluded), in the prompts' order. Neither
        EOS nor a stop token is chosen among the first `min_new_tokens`."""
        ...

    def score(self, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
        """The log-probability of every token of each sequence (>= 2 tokens) given those
        before it."""
        ...


def stop_token(tokenizer: Tokenizer, text: str) -> int:
    """The id that ends a completion at `text`: the last of its encoding, as LongBench's pred.py
    takes `tokenizer.encode("\\n")[-1]` (LLaMA's SentencePiece encodes "\\n" as a space piece
    then the newline byte)."""
    return tokenizer.encode(text)[-1]


def with_bos(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` behind BOS when the tokenizer has one, as Hugging Face LLaMA
    tokenizers encode a prompt (and as training packs documents)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + tokenizer.encode(text)


class ModelEngine:
    """An `Engine` over a `Llama` (any attention). A model built or loaded on a `mesh` runs
    sharded on it (the calls set it); without one, on the mesh set around the calls, if any.

    Sequences run `batch_size` at a time, right-padded to `buckets` lengths, so a run over many
    lengths compiles once per bucket. `max_length` defaults to the model's `max_position`, and
    may not pass it (but for StreamingLLM and LM-Infinite, whose RoPE distances are capped): the
    model would extrapolate silently; load it with a larger max_position to do so knowingly.
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        buckets: Buckets = Buckets(),
        max_length: int | None = None,
        progress: bool = False,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer's {tokenizer.vocab_size} ids do not fit the model's vocabulary "
                f"of {model.config.vocab_size}"
            )
        self.model, self._tokenizer = model, tokenizer
        self.batch_size, self.buckets, self.progress = int(batch_size), buckets, progress
        self._max_length = _checked_max_length(max_length, model.config)
        self.mesh = mesh

    def _on_mesh(self):
        """The context the calls run in: the engine's mesh, if it has one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return self._max_length

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_tokens: Sequence[int] = (),
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        self._check_fits([len(p) for p in prompts], max_new_tokens)
        ends = end_ids(self.model.config, self.tokenizer.eos_id, stop_tokens)
        with self._on_mesh():
            return self._generate(prompts, max_new_tokens, list(ends), min_new_tokens)

    def _check_fits(self, sizes: Sequence[int], max_new_tokens: int) -> None:
        """Raises if a sequence of sizes[i] tokens, with `max_new_tokens` more, would not fit
        `max_length` (the model would read positions it was not given: silently)."""
        over = [i for i, n in enumerate(sizes) if n + max_new_tokens > self.max_length]
        if not over:
            return
        i = over[0]
        new = f" and max_new_tokens={max_new_tokens}" if max_new_tokens else ""
        raise ValueError(
            f"sequence {i} of {sizes[i]} tokens{new} does not fit the engine's "
            f"max_length={self.max_length} (default: the model's "
            f"max_position={self.model.config.max_position}); truncate it"
        )

    def _check_ids(self, sequences: Sequence[Sequence[int]]) -> None:
        """Raises naming the first sequence (the caller's index: batches are sorted) with an id
        outside the vocabulary, before any batch runs."""
        vocab = self.model.config.vocab_size
        for i, sequence in enumerate(sequences):
            ids = np.asarray(sequence)
            bad = np.flatnonzero((ids < 0) | (ids >= vocab))
            if len(bad):
                raise ValueError(
                    f"sequence {i} holds token id {ids[bad[0]]} at position {bad[0]}, outside "
                    f"the model's vocabulary [0, {vocab})"
                )

    def _generate(
        self, prompts, max_new_tokens: int, stops: list[int], min_new_tokens: int
    ) -> list[list[int]]:
        out = completions(
            self.model,
            prompts,
            max_new_tokens,
            stop_tokens=stops,
            min_new_tokens=min_new_tokens,
            batch_size=self.batch_size,
            buckets=self.buckets,
            progress=self.progress,
        )
        return list(out)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
        short = [i for i, s in enumerate(sequences) if len(s) < 2]
        if short:
            i = short[0]
            raise ValueError(
                f"sequence {i} has {len(sequences[i])} tokens: a scored sequence needs at least 2 "
                "(the first is only context)"
            )
        self._check_fits([len(s) for s in sequences], 0)
        self._check_ids(sequences)
        with self._on_mesh():
            return self._score(sequences)

    def _score(self, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
        graphdef, state = nnx.split(self.model)
        out: list[TokenScores] = [None] * len(sequences)  # type: ignore[list-item]
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        shards = shard_count(self.model.rules.spec(("batch",))[0])  # under the current mesh
        size = -(-self.batch_size // shards) * shards
        for first in range(0, len(order), size):
            rows = order[first : first + size]
            batch = [sequences[i] for i in np.resize(rows, size)]
            tokens, lengths = pad_prompts(batch, self.model.config.vocab_size)
            width = self.buckets.round_up(tokens.shape[1])
            tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
            logprobs, greedy = _score_rows(graphdef, state, tokens, lengths)
            logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
            for j, i in enumerate(rows):
                n = len(sequences[i])
                out[i] = TokenScores(logprobs[j, : n - 1], greedy[j, : n - 1])
        return out


# Positions per slice of the LM head when scoring: [B, 512, V] float32 logits at a time
# (LLaMA2-7B, 8 rows: 0.5 GiB), where the whole [B, T, V] would be 33 GiB at 32K tokens.
SCORE_SLICE = 512


@functools.partial(jax.jit, static_argnames=("graphdef", "positions"))
def _score_rows(graphdef, state, tokens, lengths, positions=SCORE_SLICE):
    """Right-padded tokens [B, T] with lengths [B] -> (log p of tokens[:, 1:] [B, T-1],
    whether each is the argmax [B, T-1]); each row is attended at its own length. The LM head
    runs over `positions` positions at a time."""
    model = nnx.merge(graphdef, state)
    x, _ = model.prefill_hidden(tokens, tokens.shape[1], lengths=lengths)
    b, t, d = x.shape
    size = min(positions, t)
    padded = -(-t // size) * size
    x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, padded - t + 1)))

    def score(inputs):
        x_slice, targets_slice = inputs  # [B, size, D], [B, size]
        logits = model.logits(x_slice)
        picked = jnp.argmax(logits, axis=-1) == targets_slice
        return -cross_entropy(logits, targets_slice), picked

    def slices(a):  # [B, padded, ...] -> [padded / size, B, size, ...]
        return jnp.moveaxis(a.reshape(b, padded // size, size, *a.shape[2:]), 1, 0)

    logprobs, greedy = jax.lax.map(score, (slices(x), slices(targets)))
    logprobs, greedy = (jnp.moveaxis(a, 0, 1).reshape(b, padded) for a in (logprobs, greedy))
    return logprobs[:, : t - 1], greedy[:, : t - 1]


def _checked_max_length(max_length: int | None, config: ModelConfig) -> int:
    """The engine's max_length: the model's max_position by default; an int >= 2 that does not
    pass it, unless the model's RoPE distances are capped (StreamingLLM, LM-Infinite)."""
    if max_length is None:
        return config.max_position
    if not is_int(max_length) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    max_length = int(max_length)  # a NumPy integer too: JSON and the progress text take ints
    if not config.positions_fit(max_length):
        raise ValueError(
            f"max_length={max_length} is past the model's max_position={config.max_position}: "
            "it would extrapolate silently; load it with max_position raised (e.g. "
            f"load_model(..., max_position={max_length})) to do so knowingly"
        )
    return max_length
