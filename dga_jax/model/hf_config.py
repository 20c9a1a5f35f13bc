"""A Hugging Face LLaMA, Mistral or Qwen2 `config.json` as a `ModelConfig`, and back (for
export); a sliding window (Mistral's, Qwen2's where every layer slides) is `sliding_window`.

Every HF key is read by its type and named in errors by its HF name (`ConfigError`);
`ModelConfig.from_hf` reads a file through `hf_to_config`.
"""

from __future__ import annotations

from typing import Any

from dga_jax import strict
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_rope import (
    hf_max_position,
    hf_rope_scaling,
    hf_rope_theta,
    hf_value,
    require,
    rope_to_hf,
)
from dga_jax.model.rope_scaling import RopeScaling

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Each architecture's model_type. A Mistral is LLaMA with a sliding window over every layer
# (none: sliding_window null, as 7B v0.2 and later); a Qwen2 is LLaMA with biases on q, k and v,
# read where every layer attends alike (`_qwen2_window`).
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCHITECTURES = {kind: arch for arch, kind in _MODEL_TYPES.items()}  # absent architectures
# The keys whose defaults in transformers differ from LlamaConfig's: they must be there.
_DIFFERING_DEFAULTS = {
    "mistral": ("num_key_value_heads", "max_position_embeddings"),
    "qwen2": ("num_key_value_heads", "max_position_embeddings"),
}
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)

SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN computes "swish" as SiLU too
_QWEN2_LAYER_TYPES = ("full_attention", "sliding_attention")


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Maps the fields of a HF `LlamaConfig`, `MistralConfig` or `Qwen2Config` dict (a Qwen2
    whose layers attend alike: `_qwen2_window`); other architectures, and a missing, unsupported
    or mistyped (null, a string for a number or a bool) field, raise a `ConfigError` naming the
    key."""
    if not isinstance(hf, dict):
        raise ConfigError(f"a HF config must be a JSON object, got {type(hf).__name__}")
    archs = strict.check("architectures", hf.get("architectures"), tuple[str, ...] | None)
    model_type = hf.get("model_type", "llama")
    archs = archs or (_ARCHITECTURES.get(model_type, "LlamaForCausalLM"),)
    if archs[0] not in SUPPORTED_HF_ARCHITECTURES or _MODEL_TYPES[archs[0]] != model_type:
        raise ConfigError(
            f"unsupported architecture {archs} (model_type "
            f"{hf.get('model_type')!r}); supported: {SUPPORTED_HF_ARCHITECTURES}"
        )
    _check_llama_variant(hf, model_type)
    require(hf, (*_HF_REQUIRED, *_DIFFERING_DEFAULTS.get(model_type, ())), "")
    for key in _HF_REQUIRED:
        strict.check(key, hf[key], int)
    heads, scaling = hf["num_attention_heads"], hf_rope_scaling(hf)
    # null num_key_value_heads / head_dim: transformers' defaults, as when absent
    kv_heads = hf_value(hf, "num_key_value_heads", int | None)
    head_dim = hf_value(hf, "head_dim", int | None)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=hf["hidden_size"] // heads if head_dim is None else head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf_value(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=hf_rope_theta(hf),
        rope_scaling=scaling,
        max_position=_max_position(hf, scaling),
        tie_embeddings=hf_value(hf, "tie_word_embeddings", bool | None, False) or False,
        sliding_window=_hf_sliding_window(hf, model_type),
        **_hf_biases(hf, model_type),
        **_hf_token_ids(hf),
    )


def _max_position(hf: dict[str, Any], scaling: RopeScaling) -> int:
    """max_position_embeddings, or YaRN's context where longer: Qwen2.5 ships its pretraining
    32K there and documents rope_scaling yarn, factor 4, for 128K (transformers checks neither)."""
    longest = hf_max_position(hf)
    if scaling.kind == "yarn":
        return max(longest, round(scaling.factor * scaling.original_max_position))
    return longest


def _hf_sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """ModelConfig's sliding_window: Mistral's slides in every layer (transformers reads no
    layer_types for it), Qwen2's where every layer slides (`_qwen2_window`); LLaMA has none."""
    if model_type == "mistral":
        return _hf_window(hf)
    if model_type == "qwen2":
        return _qwen2_window(hf)
    return None


def _hf_window(hf: dict[str, Any]) -> int | None:
    """sliding_window as transformers' masks read it (keys t - window + 1 .. t per query t):
    4096, its default, where absent; null: the whole past. Below 1 a query would see no key."""
    window = hf_value(hf, "sliding_window", int | None, 4096)
    if window is not None and window < 1:
        raise ConfigError(f"sliding_window must be an int >= 1 or null, got {window!r}")
    return window


def _qwen2_window(hf: dict[str, Any]) -> int | None:
    """A Qwen2's one window: transformers' Qwen2Config keeps sliding_window only with
    use_sliding_window, and slides it in the layers `_qwen2_sliding_layers` names. Every layer
    sliding: the window; none: None. A mix of sliding and full layers is refused: the model has
    one attention for all its layers."""
    window = _hf_window(hf) if hf_value(hf, "use_sliding_window", bool | None, False) else None
    sliding, source = _qwen2_sliding_layers(hf, window)
    if all(sliding):
        return window
    if any(sliding):
        raise ConfigError(
            f"unsupported sliding-window layers ({source}): a Qwen2 model is read only with one "
            "attention in every layer, full (use_sliding_window false, as Qwen2 and Qwen2.5 "
            "ship) or one sliding window (max_window_layers 0)"
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
            f"unsupported layer_types {list(layer_types)}: a Qwen2 model has one of "
            f"{_QWEN2_LAYER_TYPES} for each of its num_hidden_layers={layers}"
        )
    if window is None and "sliding_attention" in layer_types:  # transformers fails there too
        raise ConfigError(
            f"layer_types {list(layer_types)} name sliding_attention layers, but the config "
            "sets no window (use_sliding_window false or sliding_window null)"
        )
    return [kind == "sliding_attention" for kind in layer_types], f"layer_types={list(layer_types)}"


def _hf_biases(hf: dict[str, Any], model_type: str) -> dict[str, bool]:
    """ModelConfig's qkv_bias and o_bias: Qwen2's q, k, v always have biases; LLaMA's
    attention_bias puts one on all four projections; Mistral has none."""
    if model_type == "qwen2":
        return {"qkv_bias": True, "o_bias": False}
    bias = model_type == "llama" and bool(hf_value(hf, "attention_bias", bool | None, False))
    return {"qkv_bias": bias, "o_bias": bias}


def _check_llama_variant(hf: dict[str, Any], model_type: str) -> None:
    """A `ConfigError` naming the key of a LLaMA variant our model does not compute: MLP
    biases, another activation, quantized weights (whose tensors are not the float weights we
    read)."""
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


def _hf_token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's token id fields from HF's bos/eos/pad_token_id (eos: an id or a list)."""
    eos = hf.get("eos_token_id")
    eos = eos if isinstance(eos, list) or eos is None else [eos]
    return {
        "bos_token_id": strict.check("bos_token_id", hf.get("bos_token_id"), int | None),
        "eos_token_ids": strict.check("eos_token_id", eos, tuple[int, ...] | None),
        "pad_token_id": strict.check("pad_token_id", hf.get("pad_token_id"), int | None),
    }


def with_generation_token_ids(config: ModelConfig, generation: dict[str, Any]) -> ModelConfig:
    """`config` (from a checkpoint's config.json) with the token ids of its generation_config.json
    (`generation`), which transformers' `generate` reads instead: the eos ids of both,
    generation_config.json's first (Llama-3-Instruct's lists [128001, 128009], its config.json
    one of them), and bos / pad where config.json sets none. A bad id is a `ConfigError`."""
    if not isinstance(generation, dict):
        raise ConfigError(f"a HF generation config must be a JSON object, got {generation!r}")
    ids = _hf_token_ids(generation)
    eos = config.eos_token_ids
    if ids["eos_token_ids"] is not None:
        eos = tuple(dict.fromkeys((*ids["eos_token_ids"], *(eos or ()))))
    return config.replace(
        bos_token_id=ids["bos_token_id"] if config.bos_token_id is None else config.bos_token_id,
        eos_token_ids=eos,
        pad_token_id=ids["pad_token_id"] if config.pad_token_id is None else config.pad_token_id,
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` fields of a config (for export); unset token ids are left out, so
    transformers' own defaults apply as they did to a source config without them."""
    return {
        **_architecture_to_hf(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_to_hf(config.rope_scaling),
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": config.param_dtype,
        **hf_token_ids(config),
    }


def _architecture_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config with biases on q, k, v alone is a Qwen2 (its window in every layer), one without
    biases a Mistral with a sliding window, else LLaMA, without biases or with all four
    (attention_bias); an output bias alone, or all four with a window, has no HF architecture."""
    window = config.sliding_window
    if config.qkv_bias and not config.o_bias:
        qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        if window is None:
            return {**qwen2, "use_sliding_window": False}
        # max_window_layers 0: transformers' layer_types slide the window from the first layer on
        return {
            **qwen2,
            "use_sliding_window": True,
            "sliding_window": window,
            "max_window_layers": 0,
        }
    if config.o_bias and not config.qkv_bias:
        raise ConfigError(
            "model.o_bias without model.qkv_bias has no Hugging Face architecture to export to "
            "(LLaMA's attention_bias sets both, Qwen2 has q, k, v biases only)"
        )
    if window is not None:
        if config.qkv_bias:
            raise ConfigError(
                f"model.sliding_window={window} with model.qkv_bias and model.o_bias has no "
                "Hugging Face architecture to export to (Mistral has no biases, Qwen2 q, k, v "
                "biases only, LLaMA's attention_bias no sliding window)"
            )
        mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
        return {**mistral, "sliding_window": window}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {**llama, "attention_bias": config.qkv_bias, "mlp_bias": False}


def hf_token_ids(config: ModelConfig) -> dict[str, Any]:
    """HF's bos/eos/pad_token_id of a config, the unset ones left out (eos: an id or a list)."""
    eos = config.eos_token_ids
    if eos is not None:
        eos = eos[0] if len(eos) == 1 else list(eos)
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}
