"""Attention biases: Qwen2 checkpoints (q, k, v biases; a sliding window in every layer or
none) and LLaMA's attention_bias (all four projections) load with transformers' logits, decode
as they run whole, and export back."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from dga_jax import DGAConfig
from dga_jax.checkpoint import load_config, load_model
from dga_jax.checkpoint.hf_write import write_hf
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import config_to_hf
from tests.checkpoint.conftest import (
    _DEFAULTS,
    LOGIT_ATOL,
    YARN_ROPE,
    assert_decodes_as_it_runs_whole,
    build_hf_model,
    conversions,
    hf_logits,
    random_tokens,
    to_hf,
)
from tests.checkpoint.conftest import (
    converted_logits as _logits,
)


def _with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises biases to zero: random ones make them matter."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("bias"):
                weight.uniform_(-0.5, 0.5)
    return model


def _qwen2(**overrides) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**_DEFAULTS, "num_key_value_heads": 2, **overrides})
    return _with_random_biases(transformers.Qwen2ForCausalLM(config).eval())


def _qwen2_yarn_tied() -> transformers.Qwen2ForCausalLM:
    """Qwen2.5's long-context form: YaRN, tied embeddings (its small sizes)."""
    return _qwen2(rope_scaling=YARN_ROPE, tie_word_embeddings=True)


def _qwen2_sliding() -> transformers.Qwen2ForCausalLM:
    """Every layer slides a 5-key window (max_window_layers 0), shorter than the test sequence."""
    return _qwen2(use_sliding_window=True, sliding_window=5, max_window_layers=0)


def _llama_attention_bias() -> transformers.LlamaForCausalLM:
    return _with_random_biases(build_hf_model(num_key_value_heads=2, attention_bias=True))


MODELS = {
    "qwen2": _qwen2,
    "qwen2_yarn_tied": _qwen2_yarn_tied,
    "qwen2_sliding": _qwen2_sliding,
    "llama_attention_bias": _llama_attention_bias,
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (transformers model, its Orbax conversion), built once per module."""
    return conversions(tmp_path_factory, lambda name: MODELS[name]())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_biased_checkpoints_give_transformers_logits(converted, name):
    model, ckpt = converted(name)
    tokens = random_tokens()
    diff = np.max(np.abs(_logits(ckpt, tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


def test_the_biases_matter_at_this_tolerance():
    tokens, biased, zeroed = random_tokens(), _qwen2(), _qwen2()
    with torch.no_grad():
        for name, weight in zeroed.named_parameters():
            if name.endswith(("k_proj.bias", "v_proj.bias")):
                weight.zero_()
    assert np.max(np.abs(hf_logits(zeroed, tokens) - hf_logits(biased, tokens))) > 100 * LOGIT_ATOL


@pytest.mark.parametrize(
    "name, architecture",
    [
        ("qwen2", "Qwen2ForCausalLM"),
        ("qwen2_sliding", "Qwen2ForCausalLM"),
        ("llama_attention_bias", "LlamaForCausalLM"),
    ],
)
def test_export_loads_in_transformers_as_its_architecture(converted, name, architecture, tmp_path):
    model, ckpt = converted(name)
    to_hf(ckpt, tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == architecture
    window = getattr(model.config, "sliding_window", None)  # LLaMA has none
    assert getattr(exported.config, "sliding_window", None) == window
    tokens = random_tokens()
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))


def test_a_biased_model_decodes_as_it_runs_whole(converted):
    _, ckpt = converted("qwen2")
    # streaming selection: token-by-token decoding computes the same function
    streaming = DGAConfig(4, 0.25, "streaming")
    llama = load_model(ckpt, param_dtype="float32", attention="dga", dga=streaming)
    assert_decodes_as_it_runs_whole(llama)


def _qwen2_config(**overrides) -> dict:
    return transformers.Qwen2Config(
        **{**_DEFAULTS, "num_key_value_heads": 2, **overrides}
    ).to_dict()


def test_qwen2_reads_as_llama_with_qkv_biases():
    config = ModelConfig.from_hf(_qwen2_config())
    assert (config.qkv_bias, config.o_bias) == (True, False)
    assert config_to_hf(config)["model_type"] == "qwen2"


def test_qwen2_as_it_ships_loads():
    # Qwen2.5's config.json: no layer_types, a window set but switched off, max_window_layers
    # below the layer count; its MLP has no biases whatever mlp_bias says.
    hf = {**_qwen2_config(), "use_sliding_window": False, "sliding_window": 32768}
    hf.pop("layer_types")
    hf.update(max_window_layers=1, mlp_bias=True)
    assert ModelConfig.from_hf(hf).qkv_bias


def test_yarn_extends_max_position_to_its_context():
    # Qwen2.5 ships max_position_embeddings 32768 and documents YaRN factor 4 for 128K.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    hf = {**_qwen2_config(), "max_position_embeddings": 32768, "rope_scaling": yarn}
    config = ModelConfig.from_hf(hf)
    assert config.max_position == 131072 and config.positions_fit(131072)
    assert ModelConfig.from_hf(_qwen2_config()).max_position == _DEFAULTS["max_position_embeddings"]


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
            "use_sliding_window",
        ),
        (
            dict(
                use_sliding_window=True,
                sliding_window=16,
                layer_types=["full_attention", "sliding_attention"],
            ),
            "layer_types",
        ),
    ],
)
def test_a_qwen2_mixing_sliding_and_full_layers_is_refused_naming_them(changes, match):
    hf = _qwen2_config()
    hf.pop("layer_types")  # as configs written before transformers 4.53 have it
    refusal = rf"unsupported sliding-window layers \({match}.*one sliding window"
    with pytest.raises(ConfigError, match=refusal):
        ModelConfig.from_hf({**hf, **changes})


@pytest.mark.parametrize(
    "layer_types", [["sliding_attention"], ["full_attention", "chunked_attention"]]
)
def test_qwen2_layer_types_must_be_one_full_or_sliding_per_layer(layer_types):
    hf = {**_qwen2_config(), "layer_types": layer_types}
    with pytest.raises(ConfigError, match=r"^unsupported layer_types"):
        ModelConfig.from_hf(hf)


def test_qwen2_sliding_layers_without_a_window_are_refused():
    # transformers keeps such layer_types and fails in the forward (a None window): not full
    # attention, silently.
    layers = _qwen2_config()["num_hidden_layers"]
    hf = {**_qwen2_config(), "layer_types": ["sliding_attention"] * layers}
    with pytest.raises(ConfigError, match="name sliding_attention layers, but the config sets no"):
        ModelConfig.from_hf(hf)


def test_a_qwen2_whose_window_starts_past_its_layers_loads():
    hf = {**_qwen2_config(), "use_sliding_window": True, "sliding_window": 16}
    hf.pop("layer_types")
    hf["max_window_layers"] = hf["num_hidden_layers"]
    config = ModelConfig.from_hf(hf)
    assert config.qkv_bias and config.sliding_window is None


@pytest.mark.parametrize("key", ["num_key_value_heads", "max_position_embeddings"])
def test_qwen2_keys_whose_defaults_differ_from_llama_must_be_there(key):
    hf = _qwen2_config()
    hf.pop(key)
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf(hf)


def _refuses_before_writing(out, config: ModelConfig, match: str) -> None:
    """`write_hf` of `config` raises a ConfigError matching `match` before reading a tensor."""

    def read_param(path):
        raise AssertionError(f"read {path} before refusing")

    with pytest.raises(ConfigError, match=match):
        write_hf(out, config, read_param, dtype="float32", max_shard_size=2**20)
    assert not out.exists()


def test_an_output_bias_alone_has_no_architecture_to_export_to(tmp_path):
    config = ModelConfig.preset("tiny", o_bias=True)
    _refuses_before_writing(tmp_path / "hf", config, "o_bias without model.qkv_bias")


def test_attention_bias_with_a_window_has_no_architecture_to_export_to(tmp_path):
    config = ModelConfig.preset("tiny", qkv_bias=True, o_bias=True, sliding_window=8)
    match = r"sliding_window=8 with model\.qkv_bias and model\.o_bias has no Hugging Face"
    _refuses_before_writing(tmp_path / "hf", config, match)


def test_a_checkpoint_stores_its_biases_flag(converted):
    assert load_config(converted("llama_attention_bias")[1]).o_bias is True
    assert jax.tree.leaves(load_model(converted("qwen2")[1]).layers.attn.q_bias)
