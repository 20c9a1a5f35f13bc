"""Text generation with a KV cache: prefill each prompt, then one jitted step per token.

    tokens = dga_jax.generate(model, [[1, 72, 101], [1, 87]], max_new_tokens=32)
    tokens = dga_jax.generate(model, thousands_of_prompts, 32, batch_size=16, progress=True)
    for tokens in dga_jax.stream(model, [[1, 72, 101]], max_new_tokens=32): ...  # [B] each
    python -m dga_jax.generate --checkpoint DIR --tokenizer PATH --prompt TEXT

The attribute `dga_jax.generate` is the function, not this package (the top level re-exports
it): import the package's other names, `from dga_jax.generate import prefill`.

The model is an NNX `Llama`, which holds its parameters, so `generate(model, prompts, ...)`
takes no separate `params` (`nnx.update(model, params)` loads other ones). DGA models decode
with `dga_jax.ops.dga.decode.DGACache`, dense ones with `dga_jax.ops.dense_decode.DenseCache`.

A batch of prompts is right-padded to a bucket length (`Buckets`: powers of two, multiples
of a step, or the exact length) and prefilled in one call that knows each row's length: DGA
selects per row at its own length (its r, sampled queries and groups), padding is never
attended, so each row's logits and cache equal its prefill alone. The cache sizes (`max_len`,
the DGA prefix capacity) follow from the bucket, so any mix of lengths compiles once per bucket
for prefill and once per cache size for decoding. From then on every row carries its own
counts and position, and rows of different lengths decode in one batch. `generate` takes any
number of prompts and runs them in batches of `batch_size`, longest first, returning them in
the caller's order (`completions` yields each as soon as it and those before it are done).
A LongRoPE row is prefilled again, whole, at the token that takes it past the original context,
as transformers' Phi-3 `generate` does (`long_rope`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

# The checks' names re-exported: `from dga_jax.generate import Buckets, pad_prompts`.
from dga_jax.generate.inputs import GROWTHS as GROWTHS
from dga_jax.generate.inputs import Buckets as Buckets
from dga_jax.generate.inputs import batch_sizes, check_options, stop_ids
from dga_jax.generate.inputs import check_context as check_context
from dga_jax.generate.inputs import pad_prompts as pad_prompts
from dga_jax.generate.long_rope import Switch, set_rows, switch_position
from dga_jax.generate.sampling import Sampling, Stopping, sample_allowed
from dga_jax.generate.sampling import sample as sample  # re-exported: dga_jax.generate.sample
from dga_jax.model.llama import Llama
from dga_jax.ops.checks import check_lengths, is_int
from dga_jax.ops.dense_decode import DenseCache
from dga_jax.ops.dga.capacity import check_fits, prefix_capacity
from dga_jax.ops.dga.decode import DGACache
from dga_jax.ops.dga.sharded import shard_count

_COMPILES = [0]


def _count_compile(event: str, _seconds: float, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compiles this process has run since `dga_jax.generate` was imported (any function):
    the difference across a run is what it compiled."""
    return _COMPILES[0]


def prefill(
    model: Llama,
    tokens: np.ndarray,
    lengths: Sequence[int],
    max_len: int,
    capacity: int | None = None,
) -> tuple[jax.Array, DGACache | DenseCache]:
    """Right-padded prompts tokens [B, T] with `lengths` [B] -> (logits [B, V] of each row's last
    prompt token, caches for up to `max_len` tokens per row, layers leading, batch second).

    One call for every row (`Llama.prefill` with `lengths`): one compile per (B, T, max_len,
    capacity), whatever the lengths. Under a mesh (`jax.set_mesh`) the rows are filled up to a
    multiple of the devices that split the batch (copies of the first, dropped afterwards).
    `capacity`: the DGA prefix capacity, by default `prefix_capacity(config.dga, max_len,
    lengths)`; a larger one (a bucket) lets batches of other lengths share the compile.
    """
    tokens = tokens if hasattr(tokens, "shape") else np.asarray(tokens)
    if len(tokens.shape) != 2:
        raise ValueError(f"tokens must be [B, T] right-padded prompts; got shape {tokens.shape}")
    if lengths is None:
        raise ValueError(f"lengths must give each of the {len(tokens)} rows its prompt length")
    lengths = np.asarray(check_lengths(lengths, *tokens.shape))
    config = model.config
    if config.attention == "dga":
        needed = prefix_capacity(config.dga, max_len, lengths)
        if capacity is not None and capacity < needed:
            raise ValueError(
                f"capacity={capacity} prefix slots are too few: prompts of lengths up to "
                f"{lengths.max()} decoded up to max_len={max_len} need {needed}"
            )
        capacity = needed if capacity is None else capacity
    check_fits(tokens.shape[1], max_len)
    rows = len(lengths)
    extra = -rows % shard_count(model.rules.spec(("batch",))[0])
    padded = np.concatenate([np.arange(rows), np.zeros(extra, int)])
    graphdef, state = nnx.split(model)
    tokens, lengths = jnp.asarray(tokens[padded]), jnp.asarray(lengths[padded])
    logits, caches = _prefill_rows(graphdef, state, tokens, lengths, max_len, capacity)
    if not extra:
        return logits, caches
    return logits[:rows], jax.tree.map(functools.partial(_first_rows, rows), caches)


def _first_rows(rows: int, leaf: jax.Array) -> jax.Array:
    """A cache leaf [layers, B, ...] -> its first `rows` rows."""
    return leaf[:, :rows]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "capacity"))
def _prefill_rows(graphdef, state, tokens, lengths, max_len, capacity):
    model = nnx.merge(graphdef, state)
    logits, caches = model.prefill(tokens, max_len, capacity, lengths=lengths, last_only=True)
    return logits[:, 0], caches


_sample = jax.jit(sample_allowed, static_argnames="sampling")


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames="caches")
def _decode(graphdef, state, caches, tokens, key, sampling, banned):
    logits, caches = nnx.merge(graphdef, state).decode_step(tokens, caches)
    return sample_allowed(logits, key, sampling, banned), caches


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="caches")
def _decode_logits(graphdef, state, caches, tokens):
    return nnx.merge(graphdef, state).decode_step(tokens, caches)


def stream(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    seed: int = 0,
    max_len: int | None = None,
    buckets: Buckets = Buckets(),
) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [B] int32, as soon as it is sampled (one batch).

    A row ends at one of `stop_tokens` (which is yielded) and yields -1 from then on; the
    iteration ends when every row has ended or after `max_new_tokens` steps. No stop token is
    sampled among a row's first `min_new_tokens` tokens (`Stopping`). Prompts are padded
    to `buckets.round_up(longest)`; the caches hold `max_len` tokens per row (default: that
    bucket + `buckets.round_up(max_new_tokens)`) and the DGA prefix room for any prompt up to
    the bucket, so both follow from the bucket; a prompt that does not leave room for
    `max_new_tokens` in them, or within the model's `max_position` (`check_context`), is an
    error, raised before any work.
    """
    tokens, lengths = pad_prompts(prompts, model.config.vocab_size)
    check_options(max_new_tokens, seed, max_len, buckets)
    sampling = Sampling(temperature, top_k, top_p)
    stopping = Stopping(stop_ids(stop_tokens), min_new_tokens)
    key = jax.random.key(seed)
    return _stream_batch(
        model, tokens, lengths, max_new_tokens, sampling, stopping, key, max_len, buckets
    )


def _stream_batch(
    model, tokens, lengths, max_new_tokens, sampling, stopping, key, max_len, buckets
) -> Iterator[np.ndarray]:
    """`stream` for right-padded tokens [B, T'] with lengths [B]: checks, prefill, steps."""
    stops = stopping.mask(model.config.vocab_size)  # its ids checked before any work
    width, max_len = batch_sizes(model.config, int(lengths.max()), max_new_tokens, max_len, buckets)
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
    position = switch_position(model.config, lengths, max_new_tokens)
    capacity = None
    if model.config.attention == "dga":  # room for any prompt up to the bucket (or the switch)
        longest = width if position is None else max(width, position + 1)
        capacity = prefix_capacity(model.config.dga, max_len, np.arange(1, longest + 1))
    logits, caches = prefill(model, tokens, lengths, max_len, capacity)
    switch = None if position is None else Switch(position, tokens, lengths, max_len)
    refill = None
    if switch:  # the batch's width, or the switch's bucketed: widths the sequence split divides
        wide = width if width > position else min(buckets.round_up(position + 1), max_len)
        refill = functools.partial(_refill, model, switch, wide, max_len, capacity)
    return _steps(
        model, logits, caches, max_new_tokens, sampling, stopping, stops, key, switch, refill
    )


def _steps(model, logits, caches, max_new_tokens, sampling, stopping, stops, key, switch, refill):
    """The decode loop of `stream`, from the prefill's last logits [B, V] and caches; `stops`
    [V] bool: `stopping.mask`; `switch`: LongRoPE's (`long_rope.Switch`) or None; `refill`:
    rows -> their prefill again at the switch (`_refill`).

    Every row is at the same step, so the ids banned at a step are one [V] mask for all rows:
    data to the compiled step, the stop tokens' mask before `min_new_tokens`, none after."""
    graphdef, state = nnx.split(model)
    early, late = jnp.asarray(stops), jnp.zeros(stops.shape, bool)
    active = np.ones(logits.shape[0], bool)
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        banned = early if step < stopping.min_new_tokens else late
        if step == 0:
            next_tokens = _sample(logits, sub, sampling, banned)
        elif switch and len(rows := switch.rows(step, active)):
            logits, caches = _switch(graphdef, state, caches, next_tokens, switch, rows, refill)
            next_tokens = _sample(logits, sub, sampling, banned)
        else:
            next_tokens, caches = _decode(
                graphdef, state, caches, next_tokens, sub, sampling, banned
            )
        out = np.asarray(next_tokens)
        if switch:
            switch.record(step, out)
        yield np.where(active, out, -1)
        active &= ~stops[out]
        if not active.any():
            return


def _switch(graphdef, state, caches, tokens, switch, rows, refill):
    """One decoding step in which `rows` re-prefill (LongRoPE's switch, `long_rope`): the
    logits [B, V] of the next tokens, and the caches."""
    logits, caches = _decode_logits(graphdef, state, caches, tokens)
    new_logits, new_caches = refill(rows)
    return set_rows(logits, caches, jnp.asarray(rows), new_logits, new_caches)


def _refill(model, switch, width, max_len, capacity, rows):
    """`rows` prefilled again up to the switch position, right-padded to `width`."""
    lengths = [switch.position + 1] * len(rows)
    return prefill(model, switch.prompts(rows, width), lengths, max_len, capacity)


def completions(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    seed: int = 0,
    max_len: int | None = None,
    batch_size: int | None = None,
    buckets: Buckets = Buckets(),
    progress: bool = False,
) -> Iterator[list[int]]:
    """The new tokens of each prompt, stop tokens excluded, yielded in the prompts' order as
    soon as a prompt and all before it are done.

    Prompts run `batch_size` at a time (default: all at once), longest first so that a batch
    wastes little padding; every batch has `batch_size` rows (the last one filled with copies),
    so batches of one bucket share their compiles. `progress`: a progress bar on stderr. Batch
    i samples with key `fold_in(key(seed), i)`; see `stream` for the rest. Bad arguments raise
    here, not at the first `next`.
    """
    tokens, lengths = pad_prompts(prompts, model.config.vocab_size)
    check_options(max_new_tokens, seed, max_len, buckets)
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    sampling = Sampling(temperature, top_k, top_p)
    stopping = Stopping(stop_ids(stop_tokens), min_new_tokens)
    stopping.mask(model.config.vocab_size)
    batch_sizes(model.config, int(lengths.max()), max_new_tokens, max_len, buckets)
    size = len(tokens) if batch_size is None else batch_size
    run = functools.partial(
        _stream_batch,
        model,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stopping=stopping,
        max_len=max_len,
        buckets=buckets,
    )
    return _completions(run, tokens, lengths, size, stopping, seed, progress)


def _completions(run, tokens, lengths, size, stopping, seed, progress) -> Iterator[list[int]]:
    """`completions` once its arguments are checked; `run(tokens, lengths, key=)`: one batch's
    `stream`."""
    order = np.argsort(-lengths, kind="stable")
    done: dict[int, list[int]] = {}
    emitted = 0
    with tqdm.tqdm(total=len(tokens), unit="prompt", disable=not progress) as bar:
        for number, first in enumerate(range(0, len(order), size)):
            rows = order[first : first + size]
            batch = np.resize(rows, size)  # filled with copies, dropped below
            width = int(lengths[rows].max())
            key = jax.random.fold_in(jax.random.key(seed), number)
            steps = run(tokens[batch, :width], lengths[batch], key=key)
            for row, new in zip(rows, _collect(steps, size, stopping)[: len(rows)], strict=True):
                done[int(row)] = new
            bar.update(len(rows))
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1


def _collect(steps: Iterator[np.ndarray], rows: int, stopping: Stopping) -> list[list[int]]:
    """Each row's tokens from `stream`'s steps, up to (without) its stop token."""
    out: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    stops = set(int(t) for t in stopping.tokens)
    for tokens in steps:
        for i, token in enumerate(tokens.tolist()):
            ended[i] = ended[i] or token < 0 or token in stops
            if not ended[i]:
                out[i].append(token)
    return out


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    seed: int = 0,
    max_len: int | None = None,
    batch_size: int | None = None,
    buckets: Buckets = Buckets(),
    progress: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (token-id lists of any lengths), stop tokens excluded.

    temperature 0 is greedy; top_k / top_p restrict sampling (see `Sampling`); `batch_size`,
    `buckets`, `progress`: see `completions`; see `stream` for the stopping rule
    (`stop_tokens`, `min_new_tokens`) and `max_len`.
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens)
    options.update(min_new_tokens=min_new_tokens, seed=seed, max_len=max_len)
    options.update(batch_size=batch_size, buckets=buckets)
    return list(completions(model, prompts, max_new_tokens, progress=progress, **options))
