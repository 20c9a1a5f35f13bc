"""A Hugging Face LLaMA, Mistral, Qwen2, Qwen3 or Phi-3 `config.json` as a `ModelConfig`, and
back (for export); a sliding window (Mistral's, Phi-3's, Qwen2's and Qwen3's where every layer
slides) is `sliding_window`, Qwen3's q and k norms `qk_norm`, Phi-3's fused tensors
`hf_model_type` "phi3"; `hf_variants.py` reads what each architecture adds to LLaMA.

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
from dga_jax.model.hf_variants import (
    PHI3_ROPE_KINDS,
    check_llama_variant,
    check_phi3_rope,
    hf_biases,
    hf_rotary_dim,
    hf_sliding_window,
)
from dga_jax.model.rope_scaling import RopeScaling

SUPPORTED_HF_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)
# Each architecture's model_type. A Mistral is LLaMA with a sliding window over every layer
# (none: sliding_window null, as 7B v0.2 and later); a Qwen2 is LLaMA with biases on q, k and v,
# read where every layer attends alike (`_qwen2_window`); a Qwen3 is LLaMA with an RMSNorm on
# each head of q and k (`qk_norm`), windows read as Qwen2's; a Phi-3 is LLaMA in fused tensors
# (q, k, v in qkv_proj; gate, up in gate_up_proj), its window (or none) in every layer.
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
_ARCHITECTURES = {kind: arch for arch, kind in _MODEL_TYPES.items()}  # absent architectures
# The keys whose defaults in transformers differ from LlamaConfig's: they must be there.
_DIFFERING_DEFAULTS = {
    "mistral": ("num_key_value_heads", "max_position_embeddings"),
    "qwen2": ("num_key_value_heads", "max_position_embeddings"),
    "qwen3": ("num_key_value_heads", "max_position_embeddings", "head_dim"),
    "phi3": ("max_position_embeddings", "rms_norm_eps"),
}
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Maps the fields of a HF `LlamaConfig`, `MistralConfig`, `Qwen2Config` / `Qwen3Config`
    (one whose layers attend alike: `_qwen2_window`) or `Phi3Config` dict; other
    architectures, and a missing, unsupported or mistyped (null, a string for a number or a
    bool) field, raise a `ConfigError` naming the key."""
    if not isinstance(hf, dict):
        raise ConfigError(f"a HF config must be a JSON object, got {type(hf).__name__}")
    archs = strict.check("architectures", hf.get("architectures"), tuple[str, ...] | None)
    model_type = strict.check("model_type", hf.get("model_type", "llama"), str)
    archs = archs or (_ARCHITECTURES.get(model_type, "LlamaForCausalLM"),)
    if archs[0] not in SUPPORTED_HF_ARCHITECTURES or _MODEL_TYPES[archs[0]] != model_type:
        raise ConfigError(
            f"unsupported architecture {archs} (model_type "
            f"{hf.get('model_type')!r}); supported: {SUPPORTED_HF_ARCHITECTURES}"
        )
    check_llama_variant(hf, model_type)
    require(hf, (*_HF_REQUIRED, *_DIFFERING_DEFAULTS.get(model_type, ())), "")
    for key in _HF_REQUIRED:
        if strict.check(key, hf[key], int) < 1:
            raise ConfigError(f"{key} must be at least 1, got {hf[key]}")
    heads, scaling = hf["num_attention_heads"], hf_rope_scaling(hf)
    if model_type == "phi3":
        check_phi3_rope(hf, scaling)
    # null num_key_value_heads / head_dim: transformers' defaults, as when absent
    kv_heads = hf_value(hf, "num_key_value_heads", int | None)
    # Qwen3's head_dim is apart from hidden_size / heads: null there is refused, as transformers
    head_dim = hf_value(hf, "head_dim", int if model_type == "qwen3" else int | None)
    head_dim = hf["hidden_size"] // heads if head_dim is None else head_dim
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        rotary_dim=hf_rotary_dim(hf, model_type, head_dim),
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf_value(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=hf_rope_theta(hf),
        rope_scaling=scaling,
        max_position=_max_position(hf, scaling),
        tie_embeddings=hf_value(hf, "tie_word_embeddings", bool | None, False) or False,
        sliding_window=hf_sliding_window(hf, model_type),
        **hf_biases(hf, model_type),
        **_hf_token_ids(hf),
        qk_norm=model_type == "qwen3",
        hf_model_type="phi3" if model_type == "phi3" else None,
    )


def _max_position(hf: dict[str, Any], scaling: RopeScaling) -> int:
    """max_position_embeddings, or YaRN's context where longer: Qwen2.5 ships its pretraining
    32K there and documents rope_scaling yarn, factor 4, for 128K (transformers checks neither);
    dynamic NTK's factor times max_position_embeddings, the context it scales for (its export
    writes max_position_embeddings back, the original: another max_position is not kept)."""
    longest = hf_max_position(hf)
    if scaling.kind in ("yarn", "dynamic"):
        return max(longest, round(scaling.factor * scaling.original_max_position))
    return longest


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
        # dynamic NTK scales past HF's max_position_embeddings: its original context
        "max_position_embeddings": config.rope_scaling.original_max_position
        if config.rope_scaling.kind == "dynamic"
        else config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": config.param_dtype,
        **hf_token_ids(config),
    }


def _architecture_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config of `hf_model_type` "phi3" is a Phi-3 (`_phi3_to_hf`), one with q and k norms a
    Qwen3 (`_qwen3_to_hf`). Else one with biases on q, k, v alone is a Qwen2 (its window in every
    layer), one without biases a Mistral with a sliding window, else LLaMA, without biases or
    with all four (attention_bias); an output bias alone, or all four with a window, has no HF
    architecture. A model whose d_model is not num_heads x head_dim exports as a Mistral with
    no window (transformers 5's LLaMA refuses it)."""
    if config.hf_model_type == "phi3":
        return _phi3_to_hf(config)
    if config.rotary_dim not in (None, config.head_dim):
        raise ConfigError(
            f"model.rotary_dim={config.rotary_dim} (RoPE on part of each head) has no Hugging "
            "Face architecture to export to but Phi-3's (model.hf_model_type='phi3')"
        )
    if config.qk_norm:
        return _qwen3_to_hf(config)
    window = config.sliding_window
    if config.qkv_bias and not config.o_bias:
        qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        return {**qwen2, **_qwen_window(window)}
    if config.o_bias and not config.qkv_bias:
        raise ConfigError(
            "model.o_bias without model.qkv_bias has no Hugging Face architecture to export to "
            "(LLaMA's attention_bias sets both, Qwen2 has q, k, v biases only)"
        )
    # transformers 5's LlamaConfig refuses a hidden_size that is not heads x head_dim; Mistral's
    # (the same model with no window) takes it, as earlier transformers take both.
    if window is not None or config.d_model % config.num_heads:
        if config.qkv_bias:
            shape = (
                f"model.sliding_window={window}"
                if window
                else f"model.d_model={config.d_model} not divisible by model.num_heads="
                f"{config.num_heads}"
            )
            raise ConfigError(
                f"{shape} with model.qkv_bias and model.o_bias has no Hugging Face architecture "
                "to export to (Mistral has no biases, Qwen2 q, k, v biases only, LLaMA's "
                "attention_bias no sliding window and hidden_size = heads x head_dim)"
            )
        mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
        return {**mistral, "sliding_window": window}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {**llama, "attention_bias": config.qkv_bias, "mlp_bias": False}


def _qwen_window(window: int | None) -> dict[str, Any]:
    """Qwen2's and Qwen3's window fields: none, or one window in every layer (max_window_layers
    0: transformers' layer_types slide it from the first layer on)."""
    if window is None:
        return {"use_sliding_window": False}
    return {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 0}


def _qwen3_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config with q and k norms is a Qwen3: its window as Qwen2's, attention_bias on all four
    projections or none."""
    if config.qkv_bias != config.o_bias:
        raise ConfigError(
            f"model.qk_norm with model.qkv_bias={config.qkv_bias} and model.o_bias="
            f"{config.o_bias} has no Hugging Face architecture to export to (Qwen3's "
            "attention_bias sets both)"
        )
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    return {**qwen3, "attention_bias": config.qkv_bias, **_qwen_window(config.sliding_window)}


def _phi3_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Phi-3's fields: its window (null: none) in every layer, and longrope's
    original_max_position_embeddings at the top level, which Phi3Config reads before the RoPE
    section's. Attention biases, and RoPE kinds other than default and longrope, Phi-3 has not."""
    if config.qkv_bias or config.o_bias:
        raise ConfigError(
            f"model.hf_model_type='phi3' with model.qkv_bias={config.qkv_bias} and "
            f"model.o_bias={config.o_bias}: Phi-3 has no attention biases (set "
            "model.hf_model_type=None to export by the biases: LLaMA or Qwen2)"
        )
    if config.qk_norm:
        raise ConfigError(
            "model.hf_model_type='phi3' with model.qk_norm: Phi-3 has no q and k norms (set "
            "model.hf_model_type=None to export as a Qwen3)"
        )
    kind = config.rope_scaling.kind
    if kind not in PHI3_ROPE_KINDS:
        raise ConfigError(
            f"model.hf_model_type='phi3' with model.rope_scaling.kind={kind!r}: Phi-3 takes "
            f"{PHI3_ROPE_KINDS} only"
        )
    phi3 = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "sliding_window": config.sliding_window,
    }
    if kind == "longrope" and config.d_model // config.num_heads != config.head_dim:
        raise ConfigError(
            f"model.hf_model_type='phi3' with longrope and model.head_dim={config.head_dim}: "
            f"Phi3Config sizes longrope's factors by hidden_size / heads = "
            f"{config.d_model // config.num_heads}, not head_dim, and refuses these"
        )
    if kind == "longrope":
        phi3["original_max_position_embeddings"] = config.rope_scaling.original_max_position
    if config.rotary_dim not in (None, config.head_dim):
        phi3["partial_rotary_factor"] = _partial_rotary_factor(config)
    return phi3


def _partial_rotary_factor(config: ModelConfig) -> float:
    """rotary_dim / head_dim, which transformers turns back into int(head_dim * factor)."""
    factor = config.rotary_dim / config.head_dim
    if int(config.head_dim * factor) != config.rotary_dim:
        raise ConfigError(
            f"model.rotary_dim={config.rotary_dim} of head_dim={config.head_dim} has no "
            "partial_rotary_factor that transformers reads back as it"
        )
    return factor


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
