"""Sampling the next token from logits: greedy, temperature, top-k and top-p (`Sampling`), with
the stop tokens ruled out while a row is shorter than its `Stopping.min_new_tokens`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.checks import is_int, is_real

_F32 = np.finfo(np.float32)
_TEMPERATURES = (float(_F32.tiny), float(_F32.max))  # positive ones: normal float32s


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens, then to the smallest set whose probability reaches top_p (top_p
    1.0 restricts nothing: plain sampling)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        # float32 logits are divided by it: one that is 0 or inf there sampled banned ids (NaN)
        t, (low, high) = self.temperature, _TEMPERATURES
        if not (is_real(t) and (t == 0 or low <= t <= high)):  # NaN fails both
            raise ValueError(
                f"temperature must be a number >= 0, got {t!r} (a positive one must be a normal "
                f"float32, in [{low:.3g}, {high:.3g}])"
            )
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row from float logits [B, V] -> [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted so the best logit is 0: a tiny temperature sends the others to -inf (greedy), not
    # every logit to inf (a tie that the first token won).
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sampling.temperature
    rows = jnp.arange(logits.shape[0])[:, None]
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        _, top = jax.lax.top_k(logits, sampling.top_k)
        keep = jnp.zeros(logits.shape, bool).at[rows, top].set(True)
        logits = jnp.where(keep, logits, -jnp.inf)
    # At 1.0 the float32 cumulative sum reaches 1 before the tail: skipped, not cut.
    if sampling.top_p is not None and sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(before < sampling.top_p)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_allowed(logits, key, sampling: Sampling, banned) -> jax.Array:
    """`sample` from logits [B, V] with the ids `banned` [V] bool ruled out (logits -inf)."""
    return sample(jnp.where(banned, -jnp.inf, logits), key, sampling)


@dataclasses.dataclass(frozen=True)
class Stopping:
    """When a row ends: at the first of `tokens` it samples, which cannot be one of its first
    `min_new_tokens` tokens (their logits are -inf until then, as Hugging Face's min_length)."""

    tokens: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self):
        bad = [t for t in self.tokens if not is_int(t)]
        if bad:  # 2.5 never matched an id, and the results cut rows at int(2.5)
            raise ValueError(f"stop_tokens must be int token ids, got {bad[0]!r}")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")

    def mask(self, vocab_size: int) -> np.ndarray:
        """[vocab_size] bool: which ids are stop tokens (each must be one of the vocabulary's)."""
        outside = [t for t in self.tokens if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(
                f"stop token {outside[0]} is outside the model's vocabulary [0, {vocab_size}): "
                "it could never be sampled"
            )
        mask = np.isin(np.arange(vocab_size), self.tokens)
        if self.min_new_tokens and mask.all():  # every id banned: the first one was sampled
            raise ValueError(
                f"stop_tokens hold every id of the vocabulary [0, {vocab_size}): no token can be "
                f"sampled before min_new_tokens={self.min_new_tokens}"
            )
        return mask
