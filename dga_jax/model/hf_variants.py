"""What each Hugging Face architecture adds to LLaMA, read from its `config.json`: the sliding
window (Mistral's and Phi-3's in every layer, Qwen2's where every layer slides), the attention
biases (LLaMA's `attention_bias`, Qwen2's q, k, v), and the variants refused by name (another
activation, MLP biases, quantized weights, a Phi-3's RoPE other than longrope), and the RoPE
channels (Phi-4-mini rotates 0.75 of each head).
`hf_config.py` maps the rest and calls these.
"""

from __future__ import annotations

from typing import Any

from dga_jax import strict
from dga_jax.errors import ConfigError
from dga_jax.model.hf_rope import hf_value, require, rope_section
from dga_jax.model.rope_scaling import RopeScaling

SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN computes "swish" as SiLU too
_QWEN2_LAYER_TYPES = ("full_attention", "sliding_attention")
# The RoPE kinds transformers' Phi3Config takes (default, and longrope, whose old names "su" and
# "yarn" `hf_rope_scaling` reads as longrope in a Phi-3).
PHI3_ROPE_KINDS = ("none", "longrope")


def hf_sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """ModelConfig's sliding_window: Mistral's and Phi-3's slide in every layer (transformers
    reads no layer_types for them; absent, Mistral's is 4096, Phi-3's none), Qwen2's where every
    layer slides (`_qwen2_window`, Qwen3's alike); LLaMA has none."""
    if model_type == "mistral":
        return _hf_window(hf, 4096)
    if model_type == "phi3":
        return _hf_window(hf, None)
    if model_type in ("qwen2", "qwen3"):
        return _qwen2_window(hf)
    return None


def _hf_window(hf: dict[str, Any], default: int | None) -> int | None:
    """sliding_window as transformers' masks read it (keys t - window + 1 .. t per query t):
    `default` (the model's) where absent; null: the whole past. Below 1 a query would see no
    key."""
    window = hf_value(hf, "sliding_window", int | None, default)
    if window is not None and window < 1:
        raise ConfigError(f"sliding_window must be an int >= 1 or null, got {window!r}")
    return window


def _qwen2_window(hf: dict[str, Any]) -> int | None:
    """A Qwen2's (or Qwen3's) one window: transformers' Qwen2Config keeps sliding_window only with
    use_sliding_window, and slides it in the layers `_qwen2_sliding_layers` names. Every layer
    sliding: the window; none: None. A mix of sliding and full layers is refused: the model has
    one attention for all its layers."""
    use_window = hf_value(hf, "use_sliding_window", bool | None, False)
    window = _hf_window(hf, 4096) if use_window else None
    sliding, source = _qwen2_sliding_layers(hf, window)
    if all(sliding):
        return window
    if any(sliding):
        raise ConfigError(
            f"unsupported sliding-window layers ({source}): a Qwen2 or Qwen3 model is read only "
            "with one attention in every layer, full (use_sliding_window false, as Qwen2, Qwen2.5 "
            "and Qwen3 ship) or one sliding window (max_window_layers 0)"
        )
    return None


def _qwen2_sliding_layers(hf: dict[str, Any], window: int | None) -> tuple[list[bool], str]:
    """Which layers slide `window`: those transformers' `layer_types` names sliding_attention,
    or, where absent, those from max_window_layers on; and the keys that say so, for errors."""
    layers = hf["num_hidden_layers"]
    layer_types = strict.check("layer_types", hf.get("layer_types"), tuple[str, ...] | None)
    if layer_types is None:
        first = hf_value(hf, "max_window_layers", int, 28)
        source = (
            f"use_sliding_window=true, sliding_window={window}, in layers from "
            f"max_window_layers={first}"
        )
        return [window is not None and i >= first for i in range(layers)], source
    if len(layer_types) != layers or not set(layer_types) <= set(_QWEN2_LAYER_TYPES):
        raise ConfigError(
            f"unsupported layer_types {list(layer_types)}: a Qwen2 or Qwen3 model has one of "
            f"{_QWEN2_LAYER_TYPES} for each of its num_hidden_layers={layers}"
        )
    if window is None and "sliding_attention" in layer_types:  # transformers fails there too
        raise ConfigError(
            f"layer_types {list(layer_types)} name sliding_attention layers, but the config "
            "sets no window (use_sliding_window false or sliding_window null)"
        )
    return [kind == "sliding_attention" for kind in layer_types], f"layer_types={list(layer_types)}"


def hf_biases(hf: dict[str, Any], model_type: str) -> dict[str, bool]:
    """ModelConfig's qkv_bias and o_bias: Qwen2's q, k, v always have biases; LLaMA's and
    Qwen3's attention_bias puts one on all four projections; Mistral and Phi-3 have none
    (transformers' Phi-3 reads no attention_bias)."""
    if model_type == "qwen2":
        return {"qkv_bias": True, "o_bias": False}
    reads_bias = model_type in ("llama", "qwen3")
    bias = reads_bias and bool(hf_value(hf, "attention_bias", bool | None, False))
    return {"qkv_bias": bias, "o_bias": bias}


def check_llama_variant(hf: dict[str, Any], model_type: str) -> None:
    """A `ConfigError` naming the key of a LLaMA variant our model does not compute: MLP
    biases, another activation, quantized weights (whose tensors are not the float weights we
    read). RoPE on part of each head: `hf_rotary_dim`."""
    if model_type == "llama" and hf.get("mlp_bias"):  # Qwen2's and Mistral's MLPs have none
        raise ConfigError(
            f"unsupported LLaMA variant: mlp_bias={hf['mlp_bias']!r} (no MLP biases here)"
        )
    if hf.get("hidden_act", "silu") not in SILU_NAMES:
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; LLaMA uses 'silu'")
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConfigError(
            f"unsupported quantization_config (quant_method {method!r}): quantized checkpoints "
            "are not read; convert one stored in float32, bfloat16 or float16"
        )


def hf_rotary_dim(hf: dict[str, Any], model_type: str, head_dim: int) -> int | None:
    """ModelConfig's rotary_dim: int(head_dim * partial_rotary_factor) for a Phi-3 (Phi-4-mini's
    0.75), the factor of the RoPE section transformers reads (`rope_section`), else the top
    level's (Phi3Config's order); None where it is the whole head. Other architectures rotate
    every channel: another factor is refused."""
    section, rope = rope_section(hf)
    key = section + ".partial_rotary_factor"
    factor = hf_value(rope, "partial_rotary_factor", float | None, prefix=section + ".")
    if factor is None:
        key, factor = "partial_rotary_factor", hf_value(hf, "partial_rotary_factor", float | None)
    if factor is None or factor == 1.0:
        return None
    if model_type != "phi3":
        raise ConfigError(
            f"unsupported {key} {factor!r} for model_type {model_type!r}: RoPE on part of each "
            "head is read for Phi-3 only (transformers' LLaMA, Mistral and Qwen rotate it whole)"
        )
    rotary = int(head_dim * factor)
    if rotary % 2 or not 2 <= rotary <= head_dim:
        raise ConfigError(
            f"{key} {factor!r} rotates {rotary} of head_dim={head_dim} channels; RoPE needs an "
            "even count from 2 to head_dim"
        )
    return None if rotary == head_dim else rotary


def check_phi3_rope(hf: dict[str, Any], scaling: RopeScaling) -> None:
    """A Phi-3's RoPE as transformers' Phi3Config reads it: default or longrope
    (`PHI3_ROPE_KINDS`), longrope's original_max_position_embeddings at the top level, where
    Phi3Config reads it before the section's (absent, 4096: not LLaMA's default)."""
    if scaling.kind not in PHI3_ROPE_KINDS:
        raise ConfigError(
            f"unsupported RoPE type {scaling.kind!r} (rope_scaling / rope_parameters) for a "
            "Phi-3: transformers' Phi3Config takes default or longrope"
        )
    if scaling.kind != "none":
        require(hf, ("original_max_position_embeddings",), "")
