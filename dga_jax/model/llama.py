"""`Llama`: a LLaMA-style decoder with a scanned stack of layers and pluggable DGA attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.model.attention import DGAttention
from dga_jax.model.config import ModelConfig
from dga_jax.model.inputs import (
    check_ids,
    check_next_position,
    checked_positions,
    checked_tokens,
)
from dga_jax.model.layers import MLP, PROJECTION, RMSNorm, param, project
from dga_jax.ops.checks import is_int
from dga_jax.ops.context import zigzag_order
from dga_jax.ops.dense_decode import DenseCache, DenseUpdate
from dga_jax.ops.dga.decode import DGACache, DGAUpdate, apply_update
from dga_jax.ops.dga.sharded import shard_count
from dga_jax.sharding import DEFAULT_RULES, LogicalRules, check_auto_mesh

_POLICIES = jax.checkpoint_policies
_PROJECTIONS = _POLICIES.save_only_these_names(PROJECTION)  # their dots sit in a custom_vjp
REMAT = {
    "full": _POLICIES.nothing_saveable,
    "save_dots": _POLICIES.save_from_both_policies(_POLICIES.dots_saveable, _PROJECTIONS),
    "save_dots_no_batch": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable, _PROJECTIONS
    ),
}


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then SwiGLU MLP."""

    def __init__(self, config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rules, rngs=rngs)
        self.attn = DGAttention(config, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rules, rngs=rngs)
        self.mlp = MLP(config, rules, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:  # [B, T, D]
        with jax.named_scope("attention_block"):
            x = x + self.attn(self.attn_norm(x), positions)
        return self._mlp_block(x)

    def prefill(
        self, x: jax.Array, max_len: int, capacity: int | None, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, DGACache | DenseCache]:
        """x: [B, P, D] at positions 0..P-1 -> (the `__call__` output, this layer's cache)."""
        with jax.named_scope("attention_block"):
            h, cache = self.attn.prefill(self.attn_norm(x), max_len, capacity, lengths)
        return self._mlp_block(x + h), cache

    def decode(
        self, x: jax.Array, cache: DGACache | DenseCache
    ) -> tuple[jax.Array, DGAUpdate | DenseUpdate]:
        """x: [B, 1, D], the next token of each row -> ([B, 1, D], this layer's cache update)."""
        with jax.named_scope("attention_block"):
            h, update = self.attn.decode(self.attn_norm(x), cache)
        return self._mlp_block(x + h), update

    def _mlp_block(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp_block"):
            return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """Embedding, `num_layers` decoder layers stacked on a leading axis and scanned, norm, head."""

    def __init__(self, config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, *, rngs: nnx.Rngs):
        self.config = config
        self.rules = rules
        self.embed = param(
            rngs,
            (config.vocab_size, config.d_model),
            ("vocab", "embed"),
            rules,
            config.weight_dtype,
            nnx.initializers.normal(0.02),
        )
        self.layers = _stacked_layers(config, rules, rngs)
        self.norm = RMSNorm(config, rules, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(
                rngs,
                (config.d_model, config.vocab_size),
                ("embed", "vocab"),
                rules,
                config.weight_dtype,
            )

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T] int, positions: [B, T] or [T] (every row's) int -> float32 logits
        [B, T, V].

        `positions` default to each row's order: 0..T-1, or with config.context_order "zigzag"
        and the sequence split over the mesh's `seq` axes, `row_positions` (the data path
        permutes every row so).
        """
        return self.logits(self.hidden(tokens, positions))

    def token_losses(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        positions: jax.Array | None = None,
        *,
        chunks: int = 1,
    ) -> jax.Array:
        """Cross-entropy of targets [B, T] under the logits of `self(tokens, positions)`: float32
        [B, T].

        With `chunks` > 1 the LM head runs on T / chunks positions at a time (every chunks-th
        one, so each slice spans every device of a split sequence) and again in the backward:
        the [B, T, V] logits never exist whole (LLaMA2-7B at 16K tokens: 2 GiB in float32, and
        their gradient as much again), for one more LM-head matmul.

        A target outside [0, vocab_size) (HF's ignore index -100 too) is an error where targets
        are concrete, and a NaN loss under a trace, never the loss of a wrapped-around id.
        """
        tokens = jnp.asarray(tokens)  # checked by `hidden`
        targets = check_ids(targets, "targets", 2, self.config.vocab_size)
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets {list(targets.shape)} must have the shape of tokens {list(tokens.shape)}"
            )
        t = targets.shape[1]
        if not is_int(chunks) or chunks < 1 or t % chunks:
            raise ValueError(f"chunks={chunks!r} must be a positive int dividing the {t} tokens")
        x = self.hidden(tokens, positions)
        if chunks == 1:
            return cross_entropy(self.logits(x), targets)
        b, t, d = x.shape

        def strided(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [chunks, B, T / chunks, ...]
            return jnp.moveaxis(a.reshape(b, t // chunks, chunks, *a.shape[2:]), 2, 0)

        @jax.checkpoint
        def chunk_losses(carry, inputs):
            x_chunk, targets_chunk = inputs
            return carry, cross_entropy(self.logits(x_chunk), targets_chunk)

        _, losses = jax.lax.scan(chunk_losses, None, (strided(x), strided(targets)))
        return jnp.moveaxis(losses, 0, 2).reshape(b, t)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T] -> the last layer's output [B, T, D], before the final norm (`logits`
        turns it into the model's logits); `positions` as in `__call__`.

        A token id outside [0, vocab_size) is an error where tokens are concrete and NaN logits
        under a trace (`embed_tokens`). T past config.max_position is an error
        (`ModelConfig.positions_fit`): raise max_position to extrapolate knowingly.
        """
        config = self.config
        tokens = checked_tokens(tokens, self.config)
        if positions is None:
            positions = self.row_positions(tokens.shape[1])
        positions = checked_positions(positions, tokens.shape, config)
        x = self.embed_tokens(tokens)
        graphdef, state = nnx.split(self.layers)

        def layer_step(x, layer_state):
            return self._constrain(nnx.merge(graphdef, layer_state)(x, positions)), None

        if config.remat != "none":
            layer_step = jax.checkpoint(layer_step, policy=REMAT[config.remat])
        x, _ = self._over_layers(layer_step, x, state)
        return x

    def row_positions(self, seq_len: int) -> np.ndarray:
        """[T] position of each row of a training sequence under the current mesh."""
        parts = shard_count(self.rules.spec(("seq",))[0])
        if self.config.context_order == "zigzag" and parts > 1:
            return zigzag_order(seq_len, parts)
        return np.arange(seq_len)

    def prefill(
        self,
        tokens: jax.Array,
        max_len: int,
        capacity: int | None = None,
        *,
        lengths: jax.Array | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, DGACache | DenseCache]:
        """tokens: [B, P] -> (logits [B, P, V] equal to `self(tokens)`, caches).

        Every row is a whole prompt of P tokens, or with `lengths` [B] a right-padded one of
        lengths[b] tokens: its logits there and its cache are those of that prompt alone (DGA
        selects per row at its own length), one compile for every mix of lengths. The caches
        hold up to `max_len` tokens; each leaf has a leading `num_layers` axis. `capacity` is
        the DGA prefix capacity (`dga_jax.ops.dga.capacity.prefix_capacity`; default: for P, or
        for any length up to P). `last_only`: logits [B, 1, V] of each row's last token only,
        all that generation needs (the LM head over every position is P x V floats: 4 GiB for
        LLaMA2-7B at 32K).
        """
        tokens = jnp.asarray(tokens)  # checked by `prefill_hidden`
        x, caches = self.prefill_hidden(tokens, max_len, capacity, lengths=lengths)
        if last_only:
            last = tokens.shape[1] - 1 if lengths is None else jnp.asarray(lengths) - 1
            x = jnp.take_along_axis(x, jnp.broadcast_to(last, x.shape[:1])[:, None, None], axis=1)
        return self.logits(x), caches

    def prefill_hidden(
        self,
        tokens: jax.Array,
        max_len: int,
        capacity: int | None = None,
        *,
        lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, DGACache | DenseCache]:
        """`prefill` up to the last layer's output [B, P, D] (before the final norm, as `hidden`
        gives it): a caller that needs every position's scores runs the LM head over slices
        of it (`logits`), not over all P x V at once.

        Tokens are checked as `hidden` checks them; with `lengths`, P may pass max_position (a
        bucket's padding): the caller checks the rows' own lengths."""
        tokens = jnp.asarray(tokens)
        if tokens.size:  # an empty prompt is named by the cache's prefill
            if lengths is None:
                tokens = checked_tokens(tokens, self.config)
            else:
                tokens = check_ids(tokens, "tokens", 2, self.config.vocab_size)
        graphdef, state = nnx.split(self.layers)

        def layer_step(x, layer_state):
            x, cache = nnx.merge(graphdef, layer_state).prefill(x, max_len, capacity, lengths)
            return self._constrain(x), cache

        return self._over_layers(layer_step, self.embed_tokens(tokens), state)

    def decode_step(
        self, tokens: jax.Array, caches: DGACache | DenseCache
    ) -> tuple[jax.Array, DGACache | DenseCache]:
        """tokens: [B] int, the next token of each row -> (logits [B, V] float32, caches).

        Ids are checked as `hidden` checks them (NaN logits where traced ids are outside the
        vocabulary), B against the caches' rows, and, where the caches' lengths are concrete
        (not under `jax.jit`), the position written against max_position."""
        tokens = check_ids(tokens, "tokens", 1, self.config.vocab_size)
        rows = caches.length.shape[-1]  # length: [num_layers, B]
        if tokens.shape[0] != rows:
            raise ValueError(
                f"tokens {list(tokens.shape)}: decode_step takes one token for each of the "
                f"caches' {rows} rows"
            )
        check_next_position(caches, self.config)
        graphdef, state = nnx.split(self.layers)

        def layer_step(x, inputs):
            layer_state, cache = inputs
            x, update = nnx.merge(graphdef, layer_state).decode(x, cache)
            return self._constrain(x), update

        x, updates = self._over_layers(
            layer_step, self.embed_tokens(tokens[:, None]), (state, caches)
        )
        # Every layer's cache is read in the scan and written after it: XLA then updates the
        # buffers in place instead of copying each layer's cache every step.
        return self.logits(x)[:, 0], jax.vmap(apply_update)(caches, updates)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] in the compute dtype.

        An id outside [0, vocab_size) embeds as NaN: a gather would clamp it (or wrap a
        negative one) to another token's row silently, and a traced id cannot raise."""
        check_auto_mesh("the model")
        table = self.embed[...].astype(self.config.compute_dtype)
        x = table.at[tokens].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
        return self._constrain(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, D] -> float32 [B, T, V]."""
        config = self.config
        x = self.norm(x)
        head = self.embed[...].T if config.tie_embeddings else self.lm_head[...]
        return project(x, head.astype(config.compute_dtype), 1, jnp.float32)

    def _over_layers(self, layer_step, x: jax.Array, per_layer):
        """`jax.lax.scan` of layer_step over the stacked layers (per_layer: leaves [L, ...]);
        fully unrolled with config.scan_layers False."""
        self._check_config()
        return jax.lax.scan(layer_step, x, per_layer, unroll=not self.config.scan_layers)

    def _check_config(self) -> None:
        """The layers keep the config they were built with: a `config` set on the built model
        later (another attention kind, say) would reach only part of it, silently."""
        built = self.layers.attn.config
        if self.config != built:
            changed = [
                f.name
                for f in dataclasses.fields(built)
                if getattr(built, f.name) != getattr(self.config, f.name)
            ]
            raise ValueError(
                f"model.config differs in {changed} from the config its layers were built with: "
                "build Llama(config) and load these weights into it "
                "(nnx.update(new_model, nnx.state(model, nnx.Param)))"
            )

    def _constrain(self, x: jax.Array) -> jax.Array:
        """Pins activations [B, T, D] to (batch, seq) sharding where a mesh is set."""
        if jax.sharding.get_abstract_mesh().empty:
            return x
        return jax.lax.with_sharding_constraint(x, self.rules.spec(("batch", "seq", "act_embed")))


def _stacked_layers(config: ModelConfig, rules: LogicalRules, rngs: nnx.Rngs) -> DecoderLayer:
    """`num_layers` DecoderLayers whose parameters are stacked on a new leading `layers` axis."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"},
    )
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rules, rngs=rngs)

    return create(rngs)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: logits [..., V] float32, targets [...] int -> [...]; NaN
    where a target is outside [0, V) (a gather would wrap -100, HF's ignore index, to V - 100)."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    inside = (targets >= 0) & (targets < logits.shape[-1])
    return jnp.where(inside, jax.nn.logsumexp(logits, axis=-1) - picked, jnp.nan)
