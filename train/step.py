"""The optimizer and the one jitted train step (gradient accumulation, non-finite guard)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.config import OptimConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes; saved whole in checkpoints."""

    step: jax.Array  # int32 []
    params: nnx.State
    opt_state: optax.OptState
    nonfinite_streak: jax.Array  # int32 []: non-finite steps in a row (updates skipped)
    nonfinite_total: jax.Array  # int32 []


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant or cosine decay to the end factor."""
    warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            optim.learning_rate,
            max(total_steps - optim.warmup_steps, 1),
            alpha=optim.end_learning_rate_factor,
        )
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(
    optim: OptimConfig, total_steps: int, decay_mask
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; `decay_mask` (a params-shaped bool tree) spares norms."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        ),
    )


def weight_decay_mask(params: nnx.State) -> nnx.State:
    """True for weight matrices, False for norm scales and biases, as transformers' Trainer
    spares them: by name, a parameter under a module whose name ends in "norm" (the layers'
    and the final RMSNorm, Qwen3's per-head q_norm and k_norm) or one named "*bias"."""
    return jax.tree_util.tree_map_with_path(_decays, params, is_leaf=_is_variable)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _decays(path, variable: nnx.Variable) -> nnx.Variable:
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    spared = any(name.endswith("norm") for name in names) or names[-1].endswith("bias")
    return variable.replace(not spared)


def loss_fn(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    inputs: jax.Array,
    targets: jax.Array,
    loss_chunks: int = 1,
):
    """Mean next-token cross-entropy of inputs/targets [B, T]; the LM head over T / loss_chunks
    positions at a time (`Llama.token_losses`)."""
    model = nnx.merge(graphdef, params)
    return model.token_losses(inputs, targets, chunks=loss_chunks).mean()


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    loss_chunks: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over batch["inputs"/"targets"] of shape [accum, B/accum, T].

    Gradients are averaged over the micro-batches (`mean_gradients`); a non-finite loss or
    gradient norm skips the update (parameters and optimizer state unchanged) and is counted.
    """
    loss, grads = mean_gradients(state.params, graphdef, batch, loss_chunks)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jnp.where, finite)
    new_state = TrainState(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def mean_gradients(
    params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], loss_chunks: int = 1
) -> tuple[jax.Array, nnx.State]:
    """The mean loss and gradients over the micro-batches of batch["inputs"/"targets"]
    [accum, B/accum, T], one micro-batch at a time; the gradients in the parameters' dtypes.

    The sum is float32 whatever the parameters' dtype (with bfloat16 parameters it holds twice
    their bytes): a bfloat16 running sum (8 significant bits) drifted from the whole batch's
    gradient by percents after a few dozen micro-batches.
    """

    def micro_step(carry, micro):
        loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, *micro, loss_chunks)
        return jax.tree.map(_add_float32, carry, (loss, grads)), None

    zeros = jax.tree.map(_float32_zeros, (jnp.zeros((), jnp.float32), params))
    (loss, grads), _ = jax.lax.scan(micro_step, zeros, (batch["inputs"], batch["targets"]))
    accum = batch["inputs"].shape[0]
    grads = jax.tree.map(functools.partial(_mean_as, accum=accum), grads, params)
    return loss / accum, grads


def _float32_zeros(x: jax.Array) -> jax.Array:
    return jnp.zeros_like(x, dtype=jnp.float32)  # its sharding too: the scan's carry keeps it


def _add_float32(total: jax.Array, x: jax.Array) -> jax.Array:
    return total + x.astype(jnp.float32)


def _mean_as(total: jax.Array, like: jax.Array, *, accum: int) -> jax.Array:
    """`total / accum` in the dtype of `like` (the parameter: what the optimizer expects)."""
    return (total / accum).astype(like.dtype)


def eval_step(
    graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array], loss_chunks: int = 1
):
    """Mean validation loss of one batch [A, B / A, T] (laid out like a training batch), one
    micro-batch at a time as in training: the whole batch at once would hold A times the
    activations a training step does (LLaMA2-7B recipe: 64 rows of 8K tokens)."""

    def micro_loss(micro):
        return loss_fn(params, graphdef, *micro, loss_chunks)

    return jax.lax.map(micro_loss, (batch["inputs"], batch["targets"])).mean()
