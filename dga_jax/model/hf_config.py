"""A Hugging Face LLaMA `config.json` as a `ModelConfig`, and back (for export).

Every HF key is read by its type and named in errors by its HF name (`ConfigError`);
`ModelConfig.from_hf` reads a file through `hf_to_config`.
"""

from __future__ import annotations

from typing import Any

from dga_jax import strict
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig, RopeScaling

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Each architecture's model_type. A Mistral without a sliding window (7B v0.2 and later) is
# LLaMA: the same weights, computed the same way (`_check_mistral`).
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_ARCHITECTURES = {kind: arch for arch, kind in _MODEL_TYPES.items()}  # absent architectures
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_HF_LLAMA3_ROPE = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)

SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN computes "swish" as SiLU too


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Maps the fields of a HF `LlamaConfig` dict (or a `MistralConfig` without a sliding
    window: `_check_mistral`); other architectures, and a missing,
    unsupported or mistyped (null, a string for a number or a bool) field, raise a `ConfigError`
    naming the key."""
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
    if model_type == "mistral":
        _check_mistral(hf)
    _check_llama_variant(hf)
    _require(hf, _HF_REQUIRED, "")
    for key in _HF_REQUIRED:
        strict.check(key, hf[key], int)
    heads = hf["num_attention_heads"]
    # null num_key_value_heads / head_dim: transformers' defaults, as when absent
    kv_heads = _hf_value(hf, "num_key_value_heads", int | None)
    head_dim = _hf_value(hf, "head_dim", int | None)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=hf["hidden_size"] // heads if head_dim is None else head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=_hf_value(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=_hf_rope_theta(hf),
        rope_scaling=_hf_rope_scaling(hf),
        # transformers' LlamaConfig's default
        max_position=_hf_value(hf, "max_position_embeddings", int, 2048),
        tie_embeddings=_hf_value(hf, "tie_word_embeddings", bool | None, False) or False,
        **_hf_token_ids(hf),
    )


def _check_mistral(hf: dict[str, Any]) -> None:
    """A Mistral config computes as LLaMA only without a sliding window (its default is 4096:
    the key must be there, null), and with its own max_position_embeddings (the defaults
    differ, so the key must be there too)."""
    if hf.get("sliding_window", 4096) is not None:
        raise ConfigError(
            f"unsupported sliding_window {hf.get('sliding_window', '(absent: 4096)')!r}: a "
            "Mistral model is read only without one (sliding_window null, as 7B v0.2 and later)"
        )
    _require(hf, ("max_position_embeddings",), "")


def _check_llama_variant(hf: dict[str, Any]) -> None:
    """A `ConfigError` naming the key of a LLaMA variant our model does not compute: biases,
    another activation, quantized weights (whose tensors are not the float weights we read)."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"unsupported LLaMA variant: {key}={hf[key]!r} (no biases here)")
    if hf.get("hidden_act", "silu") not in SILU_NAMES:
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; LLaMA uses 'silu'")
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConfigError(
            f"unsupported quantization_config (quant_method {method!r}): quantized checkpoints "
            "are not read; convert one stored in float32, bfloat16 or float16"
        )


def _hf_value(
    values: dict[str, Any], key: str, kind: Any, default: Any = None, prefix: str = ""
) -> Any:
    """values[key] (`default` where absent) as the type `kind`: a `ConfigError` naming the HF key
    (under `prefix`) for a wrong one, e.g. null or a string ("false" would be a true bool)."""
    return strict.check(prefix + key, values.get(key, default), kind)


def _hf_rope_section(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoPE section transformers reads, and its name: a non-empty `rope_scaling` (4.x's
    name), else `rope_parameters` (>= 5, which nests rope_theta there too)."""
    section = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    return section, _hf_value(hf, section, dict[str, Any] | None) or {}


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE section's rope_theta, else the top-level one, else 10000 (transformers' order)."""
    section, rope = _hf_rope_section(hf)
    if "rope_theta" in rope:
        return _hf_value(rope, "rope_theta", float, prefix=section + ".")
    return _hf_value(hf, "rope_theta", float, 10000.0)


def _require(values: dict[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    """A `ConfigError` naming the `keys` missing from (the `prefix` section of) a HF config."""
    missing = [prefix + key for key in keys if key not in values]
    if missing:
        raise ConfigError(f"HF config key(s) {missing} missing")


def _hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    section, scaling = _hf_rope_section(hf)
    type_key = "rope_type" if "rope_type" in scaling else "type"
    kind = scaling.get(type_key, "default")
    if kind == "default":
        return RopeScaling()
    prefix = section + "."
    if kind == "linear":
        _require(scaling, ("factor",), prefix)
        return RopeScaling("linear", _hf_value(scaling, "factor", float, prefix=prefix))
    if kind == "llama3":
        _require(scaling, _HF_LLAMA3_ROPE, prefix)
        return RopeScaling(
            "llama3",
            _hf_value(scaling, "factor", float, prefix=prefix),
            _hf_value(scaling, "low_freq_factor", float, prefix=prefix),
            _hf_value(scaling, "high_freq_factor", float, prefix=prefix),
            _hf_value(scaling, "original_max_position_embeddings", int, prefix=prefix),
        )
    raise ConfigError(
        f"unsupported {prefix}{type_key} {kind!r}; supported: default, linear, llama3"
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
    scaling = config.rope_scaling
    rope = None
    if scaling.kind == "linear":
        rope = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": config.param_dtype,
        **hf_token_ids(config),
    }


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
