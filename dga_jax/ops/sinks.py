"""StreamingLLM and LM-Infinite: causal attention over the first tokens and a recent window.

Both keep, for query t, a few first tokens (StreamingLLM's attention sinks, LM-Infinite's global
branch) and a window of recent tokens, in one softmax; they differ in when the first tokens are
seen and at which RoPE distance. As interval attention (`dga_jax.ops.intervals`): the first
tokens are prefix entries (visible from `start` on), the window a band (key j visible on
[j, j + window)), and the prefix is scored with its own queries `q_far`, rotated at the
position the method gives them (`far_positions`), against keys `k_far`.

- "streaming_llm" (mit-han-lab/streaming-llm @ 2e50426, `examples/eval_long_ppl.py` with
  `--enable_pos_shift`: token by token, positions inside the cache). With S = start_size and
  R = recent_size, query t sees key j iff j <= t and (j < S or t - j <= R). The cache holds
  keys un-rotated and rotates them at their index in the cache, the query at its own index
  min(t, S + R): a window key keeps its true distance t - j, a sink is seen at distance
  min(t, S + R) - j. So the window is scored with q rotated at t against k at j, the sinks with
  q rotated at min(t, S + R) against k at j (`k_far = k`). A prefill computes exactly what
  that token-by-token decoding computes.
- "lm_infinite" (Glaciohound/LM-Infinite @ a0ce64c, the Lambda-mask path that
  `--use_lambda_attention` and `convert_llama_model` take). With L = local_size and
  G = global_size: local, 0 <= t - j < L; global, j < G and t - j >= L (disjoint: a first token
  is local while it is recent). Local scores use true positions; global ones q rotated at
  min(limit_distance, t) against un-rotated keys (`k_far`: RoPE position 0). The reference's
  prefill rotates at min(limit_distance, T - 1) for a call of T tokens and its decoding at
  min(limit_distance, t): equal wherever a global key is visible (t >= L) when
  limit_distance <= L, as in all its configurations; here it is min(limit_distance, t) in
  both, so prefill equals decoding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dga_jax.ops.checks import check_qkv, is_int
from dga_jax.ops.dga.backends import check_implementation, interval_implementation
from dga_jax.ops.intervals import Entries
from dga_jax.ops.tiles import BlockSizes
from dga_jax.sharding import with_auto_axes


def _check_sizes(kind: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{kind}.{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StreamingLLMConfig:
    """StreamingLLM: `start_size` attention sinks and a window of `recent_size` past tokens
    (the query sees at most start_size + recent_size + 1 keys). Defaults: its chat example's."""

    start_size: int = 4
    recent_size: int = 2000

    def __post_init__(self):
        _check_sizes("streaming_llm", start_size=self.start_size, recent_size=self.recent_size)

    @property
    def sinks(self) -> int:
        return self.start_size

    @property
    def sink_delay(self) -> int:
        """Positions after its own from which a sink is seen through the prefix."""
        return 0

    @property
    def window(self) -> int:
        """Band width: key j is in the band of queries j .. j + window - 1."""
        return self.recent_size + 1

    @property
    def far_rope_keys(self) -> bool:
        """Whether the prefix's keys keep their RoPE rotation (else un-rotated)."""
        return True

    def far_positions(self, positions: jax.Array) -> jax.Array:
        """The RoPE positions of the queries that score the sinks: min(t, S + R)."""
        return jnp.minimum(positions, self.start_size + self.recent_size)


@dataclasses.dataclass(frozen=True)
class LMInfiniteConfig:
    """LM-Infinite: a local window of `local_size` tokens (the query included) and the first
    `global_size` tokens beyond it, seen at distance `limit_distance`. Defaults: its LLaMA-2
    setting (`convert_llama_model(model, 4096, 10)`)."""

    global_size: int = 10
    local_size: int = 4096
    limit_distance: int = 4096

    def __post_init__(self):
        _check_sizes(
            "lm_infinite",
            global_size=self.global_size,
            local_size=self.local_size,
            limit_distance=self.limit_distance,
        )

    @property
    def sinks(self) -> int:
        return self.global_size

    @property
    def sink_delay(self) -> int:
        return self.local_size

    @property
    def window(self) -> int:
        return self.local_size

    @property
    def far_rope_keys(self) -> bool:
        return False

    def far_positions(self, positions: jax.Array) -> jax.Array:
        """The RoPE positions of the queries that score the global branch."""
        return jnp.minimum(positions, self.limit_distance)


SinkConfig = StreamingLLMConfig | LMInfiniteConfig


def _check_config(config) -> None:
    if not isinstance(config, SinkConfig):
        raise ValueError(
            f"config must be a StreamingLLMConfig or LMInfiniteConfig, got {type(config).__name__}"
        )


def band_first_token(config: SinkConfig) -> int:
    """The first position in the window band: the sinks are there too only when they are seen
    through the prefix after the window (LM-Infinite), never twice."""
    return 0 if config.sink_delay else config.sinks


def sink_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_far: jax.Array,
    k_far: jax.Array,
    config: SinkConfig,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: object = False,
) -> jax.Array:
    """StreamingLLM or LM-Infinite attention (`config`'s kind; module docstring).

    q [B, L, Hq, D] and k [B, L, Hkv, D] rotated at their positions 0..L-1, v [B, L, Hkv, D];
    q_far [B, L, Hq, D] rotated at `config.far_positions`, k_far [B, L, Hkv, D] the keys the
    first tokens are scored with (k itself, or un-rotated: `config.far_rope_keys`).
    -> [B, L, Hq, D]. Memory linear in L; each query block visits the first tokens and the
    window only.

    `implementation`: "xla", "pallas_gpu" or "pallas_tpu", the interval attention DGA runs on
    (`dga_jax.ops.dga.backends`), with their `block_sizes` and `interpret`; None picks as
    `dga_attention` does (`backends.default_for`).
    """
    scale = check_qkv(q, k, v, None)
    _check_config(config)
    if q_far.shape != q.shape or k_far.shape != k.shape:
        raise ValueError(
            f"q_far {q_far.shape} and k_far {k_far.shape} must have the shapes of q {q.shape} "
            f"and k {k.shape}"
        )
    if not q_far.dtype == k_far.dtype == q.dtype:
        raise ValueError(
            f"q_far and k_far must have q's dtype; got q_far {q_far.dtype}, k_far {k_far.dtype}, "
            f"q {q.dtype}"
        )
    implementation, block_sizes = check_implementation(
        implementation, block_sizes, interpret, q, k, v
    )
    run = functools.partial(
        _sink_attention,
        config=config,
        scale=scale,
        block_sizes=block_sizes,
        implementation=implementation,
        interpret=interpret,
    )
    return with_auto_axes(run, q, k, v, q_far, k_far)


@functools.partial(
    jax.jit, static_argnames=("config", "scale", "block_sizes", "implementation", "interpret")
)
def _sink_attention(
    q, k, v, q_far, k_far, config, *, scale, block_sizes, implementation, interpret
):
    b, seq_len, hkv, _ = k.shape
    first, band_first = min(config.sinks, seq_len), min(band_first_token(config), seq_len)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, N, H, D] -> [B, H, N, D]

    def positions(lo: int, hi: int) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hkv, hi - lo))

    prefix = Entries(
        heads_first(k_far[:, :first]),
        heads_first(v[:, :first]),
        positions(0, first) + config.sink_delay,
    )
    start = positions(band_first, seq_len)
    band = Entries(
        heads_first(k[:, band_first:]),
        heads_first(v[:, band_first:]),
        start,
        start + config.window,
    )
    attend = interval_implementation(implementation, interpret)
    return attend(
        q,
        prefix,
        band,
        scale=scale,
        block_sizes=block_sizes,
        band_lag=config.window,
        q_prefix=q_far,
    )


def sink_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_far: jax.Array,
    k_far: jax.Array,
    config: SinkConfig,
) -> jax.Array:
    """The O(L^2) definition of `sink_attention`, written from the mask rules alone."""
    _check_config(config)
    seq_len, groups = q.shape[1], q.shape[2] // k.shape[2]
    t = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    d = t - j
    if isinstance(config, StreamingLLMConfig):
        far = (j < config.start_size) & (d >= 0)
        near = (d >= 0) & (d <= config.recent_size) & ~far
    else:
        near = (d >= 0) & (d < config.local_size)
        far = (j < config.global_size) & (d >= config.local_size)
    rep = functools.partial(jnp.repeat, repeats=groups, axis=2)
    scale = q.shape[-1] ** -0.5
    s_near = jnp.einsum("bthd,bjhd->bhtj", q, rep(k), preferred_element_type=jnp.float32)
    s_far = jnp.einsum("bthd,bjhd->bhtj", q_far, rep(k_far), preferred_element_type=jnp.float32)
    s = jnp.where(near, s_near, jnp.where(far, s_far, -jnp.inf)) * scale
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhtj,bjhd->bthd", p, rep(v).astype(jnp.float32))
    return out.astype(q.dtype)
