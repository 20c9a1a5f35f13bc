"""Qwen3 checkpoints (LLaMA with an RMSNorm on each head of q and k, `ModelConfig.qk_norm`;
head_dim set apart from hidden_size / heads; attention_bias on all four projections or none; a
window as Qwen2's) load with transformers' logits, decode as they run whole, and export back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from dga_jax import DGAConfig
from dga_jax.checkpoint import load_config, load_model
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import config_to_hf
from tests.checkpoint.conftest import (
    _DEFAULTS,
    LOGIT_ATOL,
    YARN_ROPE,
    assert_decodes_as_it_runs_whole,
    conversions,
    hf_logits,
    random_tokens,
    to_hf,
)
from tests.checkpoint.conftest import (
    converted_logits as _logits,
)

# head_dim 24, not 64 / 4: Qwen3 sets it apart (its 0.6B: 16 heads of 128 over 1024 channels)
_QWEN3 = {**_DEFAULTS, "num_key_value_heads": 2, "head_dim": 24}


def _qwen3(**overrides) -> transformers.Qwen3ForCausalLM:
    """A 2-layer float32 Qwen3 with random weights; norms (q and k's included) and biases
    random, so that each matters."""
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**_QWEN3, **overrides}))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                weight.uniform_(-0.5, 0.5)
    return model.eval()


MODELS = {
    "qwen3": dict(),
    "qwen3_tied_yarn": dict(tie_word_embeddings=True, rope_scaling=YARN_ROPE),
    "qwen3_attention_bias": dict(attention_bias=True),
    "qwen3_sliding": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (transformers model, its Orbax conversion), built once per module."""
    return conversions(tmp_path_factory, lambda name: _qwen3(**MODELS[name]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qwen3_checkpoints_give_transformers_logits(converted, name):
    model, ckpt = converted(name)
    tokens = random_tokens()
    diff = np.max(np.abs(_logits(ckpt, tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


def test_the_q_and_k_norms_matter_at_this_tolerance(converted):
    model, ckpt = converted("qwen3")
    tokens = random_tokens()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_norm.weight.fill_(1.0)
        unnormed = hf_logits(model, tokens)
        model.load_state_dict(_qwen3().state_dict())  # back as the fixture built it
    assert np.max(np.abs(unnormed - _logits(ckpt, tokens))) > 100 * LOGIT_ATOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_loads_in_transformers_as_qwen3(converted, name, tmp_path):
    model, ckpt = converted(name)
    to_hf(ckpt, tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    assert exported.config.head_dim == 24
    assert exported.config.attention_bias == model.config.attention_bias
    assert exported.config.sliding_window == model.config.sliding_window
    tokens = random_tokens()
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))


def test_a_qwen3_decodes_as_it_runs_whole(converted):
    _, ckpt = converted("qwen3_attention_bias")
    streaming = DGAConfig(4, 0.25, "streaming")  # token by token, the same function
    llama = load_model(ckpt, param_dtype="float32", attention="dga", dga=streaming)
    assert_decodes_as_it_runs_whole(llama)


def test_a_checkpoint_stores_its_q_and_k_norms(converted):
    _, ckpt = converted("qwen3")
    assert load_config(ckpt).qk_norm


def test_qwen3_reads_as_llama_with_q_and_k_norms():
    config = ModelConfig.from_hf(transformers.Qwen3Config(**_QWEN3).to_dict())
    assert (config.qk_norm, config.head_dim, config.qkv_bias, config.sliding_window) == (
        True,
        24,
        False,
        None,
    )
    hf = config_to_hf(config)
    assert (hf["model_type"], hf["use_sliding_window"]) == ("qwen3", False)
    assert ModelConfig.from_hf(hf) == config


@pytest.mark.parametrize("key", ["num_key_value_heads", "max_position_embeddings", "head_dim"])
def test_qwen3_keys_whose_defaults_differ_from_llama_must_be_there(key):
    hf = transformers.Qwen3Config(**_QWEN3).to_dict()
    del hf[key]
    with pytest.raises(ConfigError, match=rf"\['{key}'\] missing"):
        ModelConfig.from_hf(hf)


def test_q_and_k_norms_with_biases_on_q_k_v_alone_have_no_architecture():
    config = ModelConfig.preset("tiny", qk_norm=True, qkv_bias=True)
    with pytest.raises(ConfigError, match=r"model\.qk_norm with model\.qkv_bias=True and model"):
        config_to_hf(config)
    with pytest.raises(ConfigError, match=r"hf_model_type='phi3' with model\.qk_norm"):
        config_to_hf(ModelConfig.preset("tiny", qk_norm=True, hf_model_type="phi3"))


def test_a_null_qwen3_head_dim_is_refused_as_transformers_refuses_it():
    """Qwen3's head_dim is its own (128 at any width): null is no hidden_size / heads there."""
    hf = {**transformers.Qwen3Config(**_QWEN3).to_dict(), "head_dim": None}
    with pytest.raises(Exception):  # noqa: B017 (transformers' own validation error)
        transformers.Qwen3Config.from_dict(hf)
    with pytest.raises(ConfigError, match=r"^head_dim must be int, got NoneType None$"):
        ModelConfig.from_hf(hf)
