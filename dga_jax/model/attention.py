"""`DGAttention`: multi-head attention (GQA, RoPE) whose core is DGA, dense causal attention or
one of the paper's baselines (StreamingLLM, LM-Infinite: `dga_jax.ops.sinks`; MInference:
`dga_jax.ops.minference`, prefill only, decoding dense).

An NNX module with no kernel code in it: the math lives in `dga_jax.ops`. Importable on its own
(`from dga_jax import DGAttention`) to put DGA into other Flax models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dga_jax.model.config import ModelConfig
from dga_jax.model.inputs import checked_positions
from dga_jax.model.layers import RMSNorm, apply_rope, param, project, rope_frequencies
from dga_jax.ops.context import ContextSplit
from dga_jax.ops.dense import SPLIT_IMPLEMENTATIONS, dense_attention
from dga_jax.ops.dense_decode import DenseCache, DenseUpdate
from dga_jax.ops.dga.api import dga_attention
from dga_jax.ops.dga.backends import default_for, importance_implementation
from dga_jax.ops.dga.decode import DGACache, DGAUpdate, prefill
from dga_jax.ops.dga.layout import dga_layout
from dga_jax.ops.dga.sharded import per_shard, shard_count
from dga_jax.ops.minference import minference_attention
from dga_jax.ops.sinks import sink_attention
from dga_jax.ops.sinks_decode import SinkCache, SinkUpdate, sink_prefill
from dga_jax.sharding import DEFAULT_RULES, LogicalRules


class DGAttention(nnx.Module):
    """q/k/v/o projections around `dga_attention` (config.attention == "dga"), dense attention,
    `sink_attention` (config.attention "streaming_llm" / "lm_infinite") or
    `minference_attention` ("minference")."""

    def __init__(self, config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, *, rngs: nnx.Rngs):
        d, h, kv, hd, dtype = (
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.weight_dtype,
        )
        self.config = config
        self.rules = rules
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), rules, dtype)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), rules, dtype)
        zeros = nnx.initializers.zeros
        if config.qkv_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), rules, dtype, zeros)
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), rules, dtype, zeros)
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), rules, dtype, zeros)
        if config.o_bias:
            self.o_bias = param(rngs, (d,), ("norm",), rules, dtype, zeros)
        if config.qk_norm:
            self.q_norm = RMSNorm(config, rules, rngs=rngs, per_head=True)
            self.k_norm = RMSNorm(config, rules, rngs=rngs, per_head=True)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] or [T] (every row's) -> [B, T, D].

        `positions` only rotate q and k (RoPE); the causal mask and DGA's groups take token t to
        be row t of the sequence, as in packed pretraining, or, with config.context_order
        "zigzag" and the sequence split over the mesh, row i to hold position
        `zigzag_order(T, P)[i]` (`Llama` passes those positions). Computed in config.dtype
        whatever x's float dtype, as Flax's `dtype` says (`nnx.Linear`'s).
        """
        self._check_x(x)
        positions = checked_positions(positions, x.shape[:2], self.config)
        if self.config.sinks is not None:
            return self._project(self._sink_attend(*self._sink_qkv(x, positions)))
        q, k, v = self._qkv(x, positions)
        return self._project(self._attend(q, k, v))

    def prefill(
        self,
        x: jax.Array,
        max_len: int,
        capacity: int | None = None,
        lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, DGACache | DenseCache | SinkCache]:
        """x: [B, P, D] at positions 0..P-1 -> (the same [B, P, D] as `__call__`, the cache).

        The cache (DGA's for config.attention == "dga", the bounded `SinkCache` of the baselines
        that keep first tokens and a window, else dense: MInference decodes densely) holds up
        to `max_len` tokens; `capacity` is the DGA prefix capacity
        (`dga_jax.ops.dga.capacity.prefix_capacity`). `lengths` [B]:
        rows right-padded, row b valid up to lengths[b] (`dga_attention`).
        """
        self._check_x(x)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        if self.config.sinks is not None:
            q, k, v, q_far, k_far = self._sink_qkv(x, positions, lengths)
            scale = self.config.head_dim**-0.5
            cache = sink_prefill(k, k_far, v, self.config.sinks, scale, lengths)
            return self._project(self._sink_attend(q, k, v, q_far, k_far)), cache
        q, k, v = self._qkv(x, positions, lengths)
        config = self.config
        dga = config.dga if config.attention == "dga" else None
        layout = None
        if dga is not None and q.shape[1]:  # selected once, for the prompt's attention and cache
            with jax.named_scope("dga_selection"):
                passes = importance_implementation(config.attention_impl or default_for(q, k, v))
                layout = dga_layout(
                    q, k, dga, config.head_dim**-0.5, lengths=lengths, passes=passes
                )
        cache = prefill(
            q,
            k,
            v,
            max_len=max_len,
            config=dga,
            capacity=capacity,
            lengths=lengths,
            layout=layout,
            window=config.sliding_window,
        )
        return self._project(self._attend(q, k, v, lengths, layout, zigzag=False)), cache

    def decode(
        self, x: jax.Array, cache: DGACache | DenseCache | SinkCache
    ) -> tuple[jax.Array, DGAUpdate | DenseUpdate | SinkUpdate]:
        """x: [B, 1, D], one token per row at position `cache.length` -> ([B, 1, D], update).

        Reads `cache` only (`cache.attend`); `dga_jax.ops.dga.decode.apply_update` writes the
        returned update.
        """
        self._check_x(x)
        rows = cache.length.shape[0]
        if x.shape[:2] != (rows, 1):  # a longer x would decode its first token only, silently
            raise ValueError(
                f"decode takes x [B, 1, D], one token for each of the cache's {rows} rows; "
                f"got x {list(x.shape)}"
            )
        positions = cache.length[:, None]
        if self.config.sinks is not None:
            qkv = self._sink_qkv(x, positions)  # the SinkCache also reads q_far and k_far
        else:
            qkv = self._qkv(x, positions)
        out, update = cache.attend(*(y[:, 0] for y in qkv))
        return self._project(out[:, None]), update

    def _check_x(self, x: jax.Array) -> None:
        """x must be floats [B, T, d_model]: an error naming it, not a broadcast in RoPE or a
        dot_general deep in a projection (nor an int array projected silently)."""
        d, shape, dtype = self.config.d_model, jnp.shape(x), jnp.result_type(x)
        if len(shape) != 3 or shape[-1] != d or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"x must be floats [B, T, d_model={d}]; got {dtype}{list(shape)}")

    def _qkv(
        self, x: jax.Array, positions: jax.Array, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D] -> q [B, T, H, K], k/v [B, T, Hkv, K], q and k rotated (`_frequencies`
        for `lengths`)."""
        q, k, v = self._projections(x)
        inv_freq = self._frequencies(positions, lengths)
        return self._rope(q, positions, inv_freq), self._rope(k, positions, inv_freq), v

    def _sink_qkv(
        self, x: jax.Array, positions: jax.Array, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, ...]:
        """x: [B, T, D] -> q, k, v as `_qkv`, and the first tokens' q_far (rotated at the
        kind's far positions) and k_far (k, or un-rotated): `dga_jax.ops.sinks`."""
        sinks = self.config.sinks
        q, k, v = self._projections(x)
        inv_freq = self._frequencies(positions, lengths)
        k_rotated = self._rope(k, positions, inv_freq)
        q_far = self._rope(q, sinks.far_positions(positions), inv_freq)
        # An un-rotated key is one rotated at position 0: its rotated channels carry YaRN's scale
        k_far = k_rotated if sinks.far_rope_keys else self._rope(k, 0 * positions, inv_freq)
        return self._rope(q, positions, inv_freq), k_rotated, v, q_far, k_far

    def _projections(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D] -> q [B, T, H, K], k/v [B, T, Hkv, K], not rotated (q and k normed per
        head with config.qk_norm)."""
        dtype = self.config.compute_dtype
        x = x.astype(dtype)  # a float32 x would promote bfloat16 weights: float32 compute
        q = project(x, self.q[...].astype(dtype), 1)  # [B, T, H, K]
        k = project(x, self.k[...].astype(dtype), 1)  # [B, T, Hkv, K]
        v = project(x, self.v[...].astype(dtype), 1)
        if self.config.qkv_bias:
            q, k, v = (
                y + b[...].astype(dtype)
                for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias))
            )
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _frequencies(self, positions: jax.Array, lengths: jax.Array | None) -> jax.Array:
        """RoPE's inverse frequencies: [K / 2], or [B, K / 2] where they follow each row's length
        (dynamic NTK, LongRoPE: `RopeScaling.length_dependent`), the row's last position + 1, or
        `lengths` [B] for right-padded rows (a row as if alone, its padding not counted)."""
        config, scaling = self.config, self.config.rope_scaling
        if scaling.length_dependent and lengths is None:
            lengths = jnp.max(positions, axis=-1, initial=-1) + 1  # T = 0: 0
        length = lengths if scaling.length_dependent else None
        return rope_frequencies(config.rope_dim, config.rope_theta, scaling, length)

    def _rope(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
        return apply_rope(x, positions, inv_freq, self.config.rope_scaling.attention_scaling)

    def _project(self, out: jax.Array) -> jax.Array:
        """[B, T, H, K] -> [B, T, D]."""
        dtype = self.config.compute_dtype
        out = project(out, self.o[...].astype(dtype), 2)
        return out + self.o_bias[...].astype(dtype) if self.config.o_bias else out

    def _sink_attend(self, q, k, v, q_far, k_far) -> jax.Array:
        self._check_whole_sequences()
        with jax.named_scope(self.config.attention + "_attention"):
            return sink_attention(
                q, k, v, q_far, k_far, self.config.sinks, implementation=self.config.attention_impl
            )

    def _check_split_dense(self, split: ContextSplit) -> None:
        """Dense attention over a sequence the "dga" strategy splits (K and V gathered) runs
        "blockwise" only: the model's key named, not the op's argument (training refuses it
        up front: `train.setup.check_mesh_fits`; generation and evaluation reach it here)."""
        impl = self.config.attention_impl
        if split.shards > 1 and impl not in SPLIT_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attention_impl={impl!r}: dense attention over a sequence split over the "
                f"mesh by context_parallel={self.config.context_parallel!r} (the 'dga' "
                "strategy) runs 'blockwise' only: set attention_impl='blockwise' or None, or "
                "context_parallel='ulysses' where the KV heads split over the devices"
            )

    def _check_whole_sequences(self) -> None:
        """The baselines run on whole sequences: batch and heads split by the compiler under a
        mesh; a sequence split over `seq` is refused (no context parallelism)."""
        if shard_count(self.rules.spec(("seq",))[0]) > 1:
            raise ValueError(
                f"attention={self.config.attention!r} has no context parallelism: use a mesh "
                "with seq = 1 (or attention 'dense' / 'dga')"
            )

    def _attend(self, q, k, v, lengths=None, layout=None, zigzag: bool | None = None) -> jax.Array:
        """`lengths` [B]: rows right-padded (prefill), read by MInference only: causal dense
        attention never lets a valid query see right padding, and DGA's `layout` (built already
        by prefill) holds each row's length, which lets a sequence split over the mesh take
        padded rows. `zigzag`: whether rows are in zig-zag order (None: as
        `config.context_order` says; prefill's rows are in position order)."""
        config = self.config
        if config.attention == "minference":
            self._check_whole_sequences()
        with jax.named_scope(config.attention + "_attention"):
            if config.attention == "minference":
                return minference_attention(q, k, v, config.minference, lengths)
            if zigzag is None:
                zigzag = config.context_order == "zigzag"
            return self._core(q, k, v, layout, zigzag)

    def _core(self, q, k, v, layout, zigzag: bool) -> jax.Array:
        """Attention per device shard under a mesh: batch and heads split, and the sequence as
        `config.context_parallel` says (`dga_jax.ops.dga.sharded`)."""
        batch, seq, heads, _ = self.rules.spec(("batch", "seq", "act_heads", None))
        return per_shard(
            self._kernel,
            q,
            k,
            v,
            batch=batch,
            seq=seq,
            heads=heads,
            strategy=self.config.context_parallel,
            zigzag=zigzag,
            layout=layout,
        )

    def _kernel(self, q, k, v, layout=None, *, split: ContextSplit) -> jax.Array:
        """Dense attention, or DGA's (with its `layout`, if built already)."""
        config = self.config
        if config.attention == "dense":
            self._check_split_dense(split)
            return dense_attention(
                q,
                k,
                v,
                implementation=config.attention_impl,
                split=split,
                window=config.sliding_window,
            )
        return dga_attention(
            q,
            k,
            v,
            config.dga,
            implementation=config.attention_impl,
            split=split,
            layout=layout,
        )
