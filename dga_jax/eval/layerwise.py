"""Running a `Llama` layer by layer for the paper's analyses (`analysis.py`, `dga_analysis.py`).

Each decoder layer is sliced out of the stacked parameters, a *probe* reads what it needs from
the layer's input (the layer's own `attn_norm` and q/k/v projections with RoPE), and the layer
itself computes the next hidden state, with the model's attention (dense or DGA). A probe
reduces its T x T weights to a few numbers per query, block of queries by block, so the
estimators hold no layer's full weights: memory stays O(T x QUERY_BLOCK) per head at T = 4K and
beyond. Sequences are whole rows at positions 0..T-1 (no padding, no zig-zag sequence split).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dga_jax.model.config import ModelConfig
from dga_jax.model.llama import DecoderLayer, Llama
from dga_jax.ops.checks import is_int
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.sharding import LogicalRules

QUERY_BLOCK = 512  # queries whose weights a probe holds at once: [B, H, QUERY_BLOCK, T] floats

# probe(layer, x [B, T, D], positions [B, T]) -> any pytree of arrays, computed in the jit.
Probe = Callable[[DecoderLayer, jax.Array, jax.Array], Any]


def walk_layers(
    model: Llama,
    x: jax.Array,
    probe: Probe | None = None,
    layers: Collection[int] | None = None,
) -> tuple[jax.Array, list[Any]]:
    """Runs the decoder layers in order on embeddings x [B, T, D] at positions 0..T-1 (T past
    the model's max_position is an error, as in the model's forward).

    Returns (the last layer's output [B, T, D], which `model.logits` turns into the model's
    logits, and per layer `probe(layer, layer input, positions)` or None). `layers`: the layer
    indices to probe (default all; -1 is the last, as in Python; one outside the model's layers
    is an error). Probes are static jit arguments: module-level functions, so that every layer
    and every call of the same shapes reuses one compile.
    """
    positions = _positions(model, *x.shape[:2])
    graphdef, state = nnx.split(model.layers)
    count = model.config.num_layers
    wanted = range(count) if layers is None else {layer_index(model, i) for i in layers}
    outs = []
    for i in range(count):
        layer_probe = probe if i in wanted else None
        x, out = _layer_step(graphdef, layer_probe, _layer_state(state, i), x, positions)
        outs.append(out)
    return x, outs


def decoder_layer(model: Llama, index: int) -> DecoderLayer:
    """Layer `index` (-1: the last) of the model's stacked layers as a module of its own (sharing
    arrays)."""
    graphdef, state = nnx.split(model.layers)
    return nnx.merge(graphdef, _layer_state(state, layer_index(model, index)))


def layer_index(model: Llama, index: int) -> int:
    """`index` as a layer number in 0..num_layers-1 (negative: from the end); one outside the
    model's layers is an error (an array index would clamp it to the last layer silently)."""
    count = model.config.num_layers
    if not -count <= index < count:
        raise ValueError(f"layer {index} is not one of the model's {count} layers (0..{count - 1})")
    return index % count


def token_rows(
    tokens: jax.Array | np.ndarray, batch_size: int = 1, *, vocab_size: int | None = None
) -> np.ndarray:
    """tokens as an integer array [N >= 1, T >= 1] of whole rows, run `batch_size` at a time,
    ids in [0, vocab_size) when it is given: an error naming the problem otherwise (one row
    given as [T], an empty batch, float ids, an id outside the vocabulary), instead of a
    broadcasting or indexing error deep in a layer, a mean over no token, or the embedding
    lookup's silent answer (NaN rows past the table, a negative id wrapped to the end)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens must be rows [N >= 1, T >= 1], not of shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, not {tokens.dtype}")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
            f"{bad.size} outside it, e.g. {bad[0]}"
        )
    check_batch_size(batch_size)
    return tokens


def check_batch_size(batch_size: int) -> None:
    """Rows per call: an int >= 1 (a range over rows with another step runs nothing or fails)."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def logits_from_embeddings(model: Llama, x: jax.Array) -> jax.Array:
    """The model's forward from input embeddings x [B, T, D]: float32 logits [B, T, V]."""
    graphdef, state = nnx.split(model)
    return _logits(graphdef, state, walk_layers(model, x)[0])


def layer_qkv(
    layer: DecoderLayer, x: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention inputs of layer input x [B, T, D]: q [B, T, H, K], k/v [B, T, Hkv, K],
    q and k rotated, exactly as the layer computes them."""
    return layer.attn._qkv(layer.attn_norm(x), positions)


def logit_scale(q: jax.Array) -> float:
    """1/sqrt(head_dim): the logit scale of the model's attention (it passes no other)."""
    return 1.0 / math.sqrt(q.shape[-1])


def with_attention(model: Llama, attention: str, dga: DGAConfig | None = None) -> Llama:
    """The same weights (shared, not copied) in a model whose `config.attention` (and `dga`,
    if given) are changed: a dense and a DGA view of one checkpoint. A changed kind takes its
    default implementation (`attention_impl` names one kind's backend)."""
    changes = {} if dga is None else {"dga": dga}
    if attention != model.config.attention:
        changes.update(attention=attention, attention_impl=None)
    config = model.config.replace(**changes)
    graphdef, _ = nnx.split(nnx.eval_shape(functools.partial(_build, config, model.rules)))
    return nnx.merge(graphdef, nnx.state(model))


def _build(config: ModelConfig, rules: LogicalRules) -> Llama:
    return Llama(config, rules, rngs=nnx.Rngs(0))


def _positions(model: Llama, batch: int, seq_len: int) -> jax.Array:
    """[B, T] positions 0..T-1: the analyses need rows in sequence order, within the model's
    positions (the model's forward refuses more, where RoPE would extrapolate silently)."""
    if not model.config.positions_fit(seq_len):
        raise ValueError(
            f"{seq_len} positions are past the model's max_position="
            f"{model.config.max_position}: shorten the rows or raise max_position to "
            "extrapolate knowingly"
        )
    if not np.array_equal(model.row_positions(seq_len), np.arange(seq_len)):
        raise ValueError("the analyses need whole sequences in order, not a zig-zag split")
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))


def _layer_state(state: nnx.State, index: int) -> nnx.State:
    return jax.tree.map(functools.partial(_take, index), state)


def _take(index: int, x: jax.Array) -> jax.Array:
    return x[index]


@functools.partial(jax.jit, static_argnames=("graphdef", "probe"))
def _layer_step(graphdef, probe, state, x, positions):
    layer = nnx.merge(graphdef, state)
    out = None if probe is None else probe(layer, x, positions)
    return layer(x, positions), out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state).logits(x)
