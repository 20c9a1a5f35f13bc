"""Text generation with a KV cache: prefill each prompt, then one jitted step per token.

    tokens = dga_jax.generate(model, [[1, 72, 101], [1, 87]], max_new_tokens=32)
    for tokens in dga_jax.stream(model, [[1, 72, 101]], max_new_tokens=32): ...  # [B] each
    python -m dga_jax.generate --checkpoint DIR --tokenizer PATH --prompt TEXT

The attribute `dga_jax.generate` is the function, not this package (the top level re-exports
it): import the package's other names, `from dga_jax.generate import prefill`.

The model is an NNX `Llama`, which holds its parameters, so `generate(model, prompts, ...)`
takes no separate `params` (`nnx.update(model, params)` loads other ones). DGA models decode
with `dga_jax.ops.dga.decode.DGACache`, dense ones with `DenseCache`.

Prompts are prefilled at their exact length, the rows of one length together (DGA's global
selection depends on the whole prompt length; one compile per distinct length and row count),
and their caches concatenated into one batch in the prompts' order; from then on every row
carries its own counts and position, so nothing is padded or attended out of place, and each
row's result equals its run alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.model.llama import Llama
from dga_jax.ops.checks import is_int, is_real
from dga_jax.ops.dga.decode import DenseCache, DGACache, check_fits, prefix_capacity
from dga_jax.ops.dga.sharded import shard_count


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens, then to the smallest set whose probability reaches top_p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row from float logits [B, V] -> [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    rows = jnp.arange(logits.shape[0])[:, None]
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        _, top = jax.lax.top_k(logits, sampling.top_k)
        keep = jnp.zeros(logits.shape, bool).at[rows, top].set(True)
        logits = jnp.where(keep, logits, -jnp.inf)
    if sampling.top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(before < sampling.top_p)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(
    model: Llama,
    tokens: np.ndarray,
    lengths: Sequence[int],
    max_len: int,
    capacity: int | None = None,
) -> tuple[jax.Array, DGACache | DenseCache]:
    """Right-padded prompts tokens [B, T] with `lengths` [B] -> (logits [B, V] of each row's last
    prompt token, caches for up to `max_len` tokens per row, layers leading, batch second).

    The rows of each distinct length are prefilled together at that length, so padding is
    never seen. Under a mesh (`jax.set_mesh`) a group is filled up to a multiple of the devices
    that split the batch. `capacity`: the DGA prefix capacity, by default
    `prefix_capacity(config.dga, max_len, lengths)`, shared by every row so that their caches
    concatenate.
    """
    lengths = [int(n) for n in lengths]
    if min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token; lengths {lengths}")
    config = model.config
    if config.attention == "dga" and capacity is None:
        capacity = prefix_capacity(config.dga, max_len, lengths)
    graphdef, state = nnx.split(model)
    by_length: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_length.setdefault(n, []).append(row)
    # Under a mesh the prefill splits its rows over the batch axes: a group is padded to a
    # multiple of them with copies of its first row, dropped afterwards.
    multiple = shard_count(model.rules.spec(("batch",))[0])
    parts, take = [], np.zeros(len(lengths), np.int32)  # take[row]: its place among all parts
    for n, rows in by_length.items():
        padded = rows + rows[:1] * (-len(rows) % multiple)
        take[rows] = sum(len(logits) for logits, _ in parts) + np.arange(len(rows))
        parts.append(
            _prefill_rows(graphdef, state, jnp.asarray(tokens[padded, :n]), max_len, capacity)
        )
    if len(parts) == 1 and len(take) == len(parts[0][0]):
        return parts[0]
    take = jnp.asarray(take)
    logits = jnp.concatenate([logits for logits, _ in parts])[take]
    caches = jax.tree.map(functools.partial(_concat_rows, take), *[c for _, c in parts])
    return logits, caches


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "capacity"))
def _prefill_rows(graphdef, state, tokens, max_len, capacity):
    logits, caches = nnx.merge(graphdef, state).prefill(tokens, max_len, capacity, last_only=True)
    return logits[:, 0], caches


def _concat_rows(take: jax.Array, *parts: jax.Array) -> jax.Array:
    """Cache leaves [layers, rows, ...] of the length groups -> [layers, B, ...]: rows `take`."""
    return jnp.concatenate(parts, axis=1)[:, take]


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames="caches")
def _decode(graphdef, state, caches, tokens, key, sampling):
    logits, caches = nnx.merge(graphdef, state).decode_step(tokens, caches)
    return sample(logits, key, sampling), caches


_sample = jax.jit(sample, static_argnames="sampling")


def stream(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_len: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [B] int32, as soon as it is sampled.

    A row ends at one of `stop_tokens` (which is yielded) and yields -1 from then on; the
    iteration ends when every row has ended or after `max_new_tokens` steps. The caches hold
    `max_len` tokens per row (default: longest prompt + max_new_tokens); a prompt that does not
    leave room for `max_new_tokens` is an error, raised before any work.
    """
    tokens, lengths = pad_prompts(prompts)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_len = max_len or int(lengths.max()) + max_new_tokens
    check_fits(int(lengths.max()) + max_new_tokens, max_len)
    sampling = Sampling(temperature, top_k, top_p)
    logits, caches = prefill(model, tokens, lengths, max_len)
    return _steps(model, logits, caches, max_new_tokens, sampling, stop_tokens, seed)


def _steps(model, logits, caches, max_new_tokens, sampling, stop_tokens, seed):
    """The decode loop of `stream`, from the prefill's last logits [B, V] and caches."""
    graphdef, state = nnx.split(model)
    stops = np.asarray(stop_tokens, np.int32)
    key = jax.random.key(seed)
    active = np.ones(logits.shape[0], bool)
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        if step == 0:
            next_tokens = _sample(logits, sub, sampling)
        else:
            next_tokens, caches = _decode(graphdef, state, caches, next_tokens, sub, sampling)
        out = np.asarray(next_tokens)
        yield np.where(active, out, -1)
        active &= ~np.isin(out, stops)
        if not active.any():
            return


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_len: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (token-id lists of any lengths), stop tokens excluded.

    temperature 0 is greedy; top_k / top_p restrict sampling (see `Sampling`); see `stream`
    for the stopping rule, `max_len` and token-by-token output.
    """
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(int(t) for t in stop_tokens)
    steps = stream(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        max_len=max_len,
    )
    for tokens in steps:
        for i, token in enumerate(tokens.tolist()):
            done[i] = done[i] or token < 0 or token in stops
            if not done[i]:
                rows[i].append(token)
    return rows


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (right-padded tokens [B, T] int32, lengths [B]); empty ones rejected."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: give at least one token")
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    return tokens, lengths
