"""Building blocks of the decoder: RMSNorm, projections, rotary embeddings (HF rotate-half),
SwiGLU MLP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dga_jax.model.config import ModelConfig, RopeScaling
from dga_jax.sharding import LogicalRules, check_auto_mesh


def param(rngs: nnx.Rngs, shape, logical, rules: LogicalRules, dtype, init=None) -> nnx.Param:
    """A parameter carrying its logical axis names; under `jax.set_mesh`, also the sharding
    they map to, so NNX creates it directly on its devices."""
    init = init or nnx.initializers.lecun_normal()
    metadata = {"logical_axes": logical}
    check_auto_mesh("the model")
    if not jax.sharding.get_abstract_mesh().empty:
        metadata["out_sharding"] = rules.spec(logical)
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis, computed in float32 as in `transformers`: of
    d_model channels, or with `per_head` of each head's head_dim (Qwen3's q_norm, k_norm)."""

    def __init__(
        self,
        config: ModelConfig,
        rules: LogicalRules,
        *,
        rngs: nnx.Rngs,
        per_head: bool = False,
    ):
        self.eps = config.norm_eps
        size, axis = (config.head_dim, "head_dim") if per_head else (config.d_model, "norm")
        self.weight = param(
            rngs, (size,), (axis,), rules, config.weight_dtype, nnx.initializers.ones
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_channels(x32.astype(x.dtype), self.weight[...].astype(x.dtype))


@jax.custom_vjp
def scale_channels(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., D] * weight [D].

    The weight's gradient is written as one contraction over every row (a dot: backends sum
    its products in float32). Autodiff's own is a reduce that, inside the model's layer scan,
    XLA:CPU keeps as [1, T, D] -> [1, D] and runs about 20-50x slower than this (0.17 s of the
    tiny model's train step at 16K tokens). The dot's result stays in x's dtype: asked for in
    float32 from bfloat16 rows, XLA:TPU kept float32 copies of every layer's rows (LLaMA2-7B on
    a v5p-8: 334 MiB more per layer, and the recipe no longer fit).
    """
    return x * weight


def _scale_channels_fwd(x, weight):
    return x * weight, (x, weight)


def _scale_channels_bwd(residuals, d_out):
    x, weight = residuals
    d_weight = jnp.einsum("...d,...d->d", d_out, x)
    return d_out * weight, d_weight.astype(weight.dtype)


scale_channels.defvjp(_scale_channels_fwd, _scale_channels_bwd)


PROJECTION = "projection"  # the checkpoint name of every projection's output (llama.REMAT)


def project(
    x: jax.Array, weight: jax.Array, axes: int, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """x [*rows, *in] times weight [*in, *out] -> [*rows, *out], contracting the `axes` dims of
    `in` (`jnp.tensordot(x, weight, axes)`): every projection of the model, the LM head too.
    `out_dtype`: the products' sums and result dtype (`preferred_element_type`; None: x's).

    The weight's gradient contracts the rows of x and of the output's gradient in that order
    (`"btd,btf->df"`). Autodiff's is `"btf,btd->fd"` then a transpose, which XLA:CPU runs as a
    physical transpose of the wider operand first: the tiny model's MLP backward (2 layers,
    16K tokens) took 1.3x as long, and its train step 1.035x with the LM head's einsum (the
    [T, V] logits' gradient transposed). The output is named `PROJECTION` for remat policies,
    which do not see the dot inside a `custom_vjp`.
    """
    return checkpoint_name(_project(x, weight, axes, out_dtype), PROJECTION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x: jax.Array, weight: jax.Array, axes: int, out_dtype) -> jax.Array:
    return jnp.tensordot(x, weight, axes, preferred_element_type=out_dtype)


def _project_fwd(x, weight, axes, out_dtype):
    return _project(x, weight, axes, out_dtype), (x, weight)


def _project_bwd(axes, _, residuals, d_out):
    x, weight = residuals
    rows = tuple(range(x.ndim - axes))
    outs = tuple(range(len(rows), d_out.ndim))
    d_x = jnp.tensordot(d_out, weight, (outs, tuple(range(axes, weight.ndim))))
    d_weight = jnp.tensordot(x, d_out, (rows, rows))
    return d_x.astype(x.dtype), d_weight.astype(weight.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def rope_frequencies(
    dim: int, theta: float, scaling: RopeScaling, length: jax.Array | None = None
) -> jax.Array:
    """Inverse frequencies [*length.shape, dim / 2] ([dim / 2] without a length) of the `dim`
    channels of each head RoPE rotates (`ModelConfig.rope_dim`), with
    transformers' linear, llama3, yarn, dynamic and longrope rules (yarn and longrope also scale
    cos and sin: `RopeScaling.attention_scaling`, which `apply_rope` takes).

    `length`: int [...], the length of each sequence rotated (its last position + 1), which
    dynamic and longrope read (`RopeScaling.length_dependent`; None: the original context, as
    transformers' frequencies before any call) and the other kinds ignore."""
    powers = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_freq = 1.0 / powers
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if scaling.kind == "yarn":
        return _yarn_frequencies(powers, dim, theta, scaling)
    if not scaling.length_dependent or length is None:
        return _short_frequencies(inv_freq, scaling)
    longer = (jnp.asarray(length) > scaling.original_max_position)[..., None]
    if scaling.kind == "dynamic":
        return jnp.where(longer, _dynamic_frequencies(dim, theta, scaling, length), inv_freq)
    long = inv_freq / jnp.asarray(scaling.long_factor, jnp.float32)
    return jnp.where(longer, long, _short_frequencies(inv_freq, scaling))


def _short_frequencies(inv_freq: jax.Array, scaling: RopeScaling) -> jax.Array:
    """The frequencies up to the original context: longrope's short factors, else as they are."""
    if scaling.kind == "longrope":
        return inv_freq / jnp.asarray(scaling.short_factor, jnp.float32)
    return inv_freq


def _dynamic_frequencies(
    dim: int, theta: float, scaling: RopeScaling, length: jax.Array
) -> jax.Array:
    """Dynamic NTK past the original context: theta grown by (factor * L / original - factor +
    1) ** (D / (D - 2)) for each length L (D = `dim`, the rotated channels), in float32 as
    transformers computes it in a call."""
    ratio = scaling.factor * jnp.asarray(length, jnp.float32) / scaling.original_max_position
    base = theta * (ratio - (scaling.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / base[..., None] ** exponents


def _llama3_frequencies(inv_freq: jax.Array, scaling: RopeScaling) -> jax.Array:
    """Long wavelengths divided by factor, short ones kept, the band between smoothed."""
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _yarn_frequencies(
    powers: jax.Array, head_dim: int, theta: float, scaling: RopeScaling
) -> jax.Array:
    """YaRN's frequencies from theta ** (2i / head_dim) [head_dim / 2] (transformers'
    `_compute_yarn_parameters`): dims below the band kept (extrapolated), dims above it divided
    by factor (interpolated), a linear ramp between."""
    low, high = _yarn_band(head_dim, theta, scaling)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp  # the share of each dim's frequency kept as it was
    interpolation, extrapolation = 1.0 / (scaling.factor * powers), 1.0 / powers
    return interpolation * (1 - extrapolated) + extrapolation * extrapolated


def _yarn_band(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[float, float]:
    """The dims at which a frequency turns beta_fast and beta_slow times over
    original_max_position: the ramp's ends, rounded out to whole dims if `truncate`, clipped to
    [0, head_dim - 1] as transformers clips them."""

    def dim_of(rotations: float) -> float:
        wavelength = scaling.original_max_position / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelength) / (2 * math.log(theta))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
) -> jax.Array:
    """Rotate-half RoPE, cos and sin times `scale` (`RopeScaling.attention_scaling`), on the
    first R = 2 * inv_freq.shape[-1] channels of each head; the others pass as they are
    (`ModelConfig.rotary_dim`). x: [B, T, H, D], positions: [B, T], inv_freq: [R/2] or each
    row's [B, R/2] -> [B, T, H, D] in x's dtype."""
    rotary = 2 * inv_freq.shape[-1]
    if rotary < x.shape[-1]:
        rotated = apply_rope(x[..., :rotary], positions, inv_freq, scale)
        return jnp.concatenate([rotated, x[..., rotary:]], axis=-1)
    if inv_freq.ndim == 2:
        inv_freq = inv_freq[:, None, :]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]

    def both_halves(f):  # [B, T, D/2] -> [B, T, 1, D]: each angle evaluated once, used twice
        y = (f(freqs) * scale).astype(x.dtype)
        return jnp.concatenate([y, y], axis=-1)[:, :, None, :]

    cos, sin = both_halves(jnp.cos), both_halves(jnp.sin)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rules: LogicalRules, *, rngs: nnx.Rngs):
        d, f, dtype = config.d_model, config.intermediate_size, config.weight_dtype
        self.gate = param(rngs, (d, f), ("embed", "mlp"), rules, dtype)
        self.up = param(rngs, (d, f), ("embed", "mlp"), rules, dtype)
        self.down = param(rngs, (f, d), ("mlp", "embed"), rules, dtype)
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        x = x.astype(self.dtype)  # in the compute dtype whatever x's, as `DGAttention`
        gate = project(x, self.gate[...].astype(self.dtype), 1)  # [B, T, F]
        up = project(x, self.up[...].astype(self.dtype), 1)
        return project(swiglu(gate, up), self.down[...].astype(self.dtype), 1)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, keeping only gate and up for the backward. Autodiff keeps three more
    [T, F] intermediates of silu, which the layer scan stacks: 1.17x the MLP backward's time at
    16K tokens on CPU."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    d_gate = d_out * up * sigmoid * (1 + gate * (1 - sigmoid))
    return d_gate, d_out * gate * sigmoid


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
