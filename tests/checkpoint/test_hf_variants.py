"""Real-world LLaMA-family configs and checkpoints: each loads with transformers' logits, or is
refused by an error naming what is unsupported; none loads silently wrong."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from dga_jax import Llama
from dga_jax.checkpoint import CheckpointError, load_config, read_hf, save_model
from dga_jax.checkpoint.hf import read_hf_config
from dga_jax.errors import ConfigError, InputError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import config_to_hf
from tests.checkpoint.conftest import (
    _DEFAULTS,
    LOGIT_ATOL,
    build_hf_model,
    hf_logits,
    random_tokens,
    save_sharded,
    to_hf,
    to_orbax,
)
from tests.checkpoint.conftest import (
    converted_logits as _logits,
)

LLAMA_VARIANTS = {
    "head_dim_32": dict(num_key_value_heads=2, head_dim=32),
    "mqa_eps_1e-2": dict(num_key_value_heads=1, rms_norm_eps=1e-2, rope_theta=500000.0),
    "pretraining_tp_2": dict(num_key_value_heads=2, pretraining_tp=2),
    "swish": dict(hidden_act="swish"),  # SiLU under its other name: it was refused
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_variants_give_transformers_logits(variant, tmp_path):
    model = build_hf_model(**LLAMA_VARIANTS[variant])
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    tokens = random_tokens(seq_len=16)
    diff = np.max(np.abs(_logits(tmp_path / "orbax", tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_give_transformers_logits(dtype, tmp_path):
    build_hf_model(num_key_value_heads=2).to(dtype).save_pretrained(tmp_path / "hf")
    # transformers' own float32 load: a .to(dtype) model's RoPE buffer is rounded too
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    to_orbax(tmp_path / "hf", tmp_path / "orbax")
    tokens = random_tokens(seq_len=16)
    diff = np.max(np.abs(_logits(tmp_path / "orbax", tokens) - hf_logits(reference, tokens)))
    assert diff <= LOGIT_ATOL


def _hf_config(config_class: str, **overrides) -> dict:
    """The config.json dict transformers saves for a tiny `config_class` config."""
    return getattr(transformers, config_class)(**{**_DEFAULTS, **overrides}).to_dict()


@pytest.mark.parametrize(
    "config_class, overrides",
    [
        ("GemmaConfig", dict(head_dim=16)),
    ],
)
def test_llama_lookalikes_are_refused_by_architecture(config_class, overrides):
    hf = _hf_config(config_class, **overrides)
    with pytest.raises(ConfigError, match=rf"unsupported architecture .*{hf['model_type']!r}"):
        ModelConfig.from_hf(hf)


def test_unsupported_rope_types_are_refused_naming_their_key():
    """transformers >= 5 saves the scaling under rope_parameters, not rope_scaling."""
    rope = {"rope_type": "proportional", "factor": 2.0}
    hf = _hf_config("LlamaConfig", rope_scaling=rope)
    name = re.escape("rope_parameters.rope_type 'proportional'")
    with pytest.raises(ConfigError, match=rf"^unsupported {name}"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    "changes",
    [
        # transformers uses the theta in the section it reads: rope_scaling, where it is non-empty
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
        {
            "rope_theta": 2e4,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        },
    ],
)
def test_rope_theta_is_read_where_transformers_reads_it(changes):
    hf = {**_hf_config("LlamaConfig"), "rope_parameters": None, **changes}
    expected = transformers.LlamaConfig.from_dict(copy.deepcopy(hf)).rope_parameters
    config = ModelConfig.from_hf(hf)
    assert (config.rope_theta, config.rope_scaling.kind) == (expected["rope_theta"], "linear")


def test_mlp_biases_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^unsupported LLaMA variant: mlp_bias=True"):
        ModelConfig.from_hf(_hf_config("LlamaConfig", mlp_bias=True))


def test_a_quantized_checkpoint_is_refused_naming_quantization_config():
    hf = {**_hf_config("LlamaConfig"), "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(ConfigError, match=r"^unsupported quantization_config \(quant_method 'fp8'"):
        ModelConfig.from_hf(hf)


def _edit_single_file(hf_dir, edit) -> None:
    """Rewrites `hf_dir/model.safetensors` with `edit(tensors)` applied."""
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def _add_head(tensors: dict, head: np.ndarray) -> None:
    tensors["lm_head.weight"] = head


def test_a_tied_checkpoint_may_hold_its_embedding_as_lm_head(tmp_path):
    build_hf_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    _edit_single_file(tmp_path, lambda t: _add_head(t, t["model.embed_tokens.weight"].copy()))
    config, params = read_hf(tmp_path)
    assert config.tie_embeddings and "lm_head" not in params


@pytest.mark.parametrize("tied_in_transformers", [True, False])
def test_a_tied_config_with_another_lm_head_is_refused(tied_in_transformers, tmp_path):
    """transformers >= 5 uses the stored head, untied; 4.x tied it to the embedding."""
    build_hf_model(tie_word_embeddings=tied_in_transformers).save_pretrained(tmp_path)
    if tied_in_transformers:
        _edit_single_file(tmp_path, lambda t: _add_head(t, -t["model.embed_tokens.weight"]))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true.*lm_head\.weight"):
        read_hf(tmp_path)


def test_invalid_generation_config_json_names_the_file_once(tmp_path):
    build_hf_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    path = re.escape(str(tmp_path / "generation_config.json"))
    with pytest.raises(InputError, match=rf"^{path} is not valid JSON"):
        read_hf_config(tmp_path)


def test_a_mistral_without_a_sliding_window_gives_transformers_logits(tmp_path):
    # Mistral 7B v0.2 and later: LLaMA's weights and computation (it was refused).
    torch.manual_seed(0)
    config = transformers.MistralConfig(**_DEFAULTS, num_key_value_heads=2, sliding_window=None)
    model = transformers.MistralForCausalLM(config).eval()
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    tokens = random_tokens(seq_len=16)
    diff = np.max(np.abs(_logits(tmp_path / "orbax", tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


WINDOW = 5  # keys per query: shorter than the test sequences, so the window matters


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory):
    """A transformers Mistral sliding a WINDOW-key window, and its Orbax conversion."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**_DEFAULTS, num_key_value_heads=2, sliding_window=WINDOW)
    model = transformers.MistralForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("mistral_window")
    to_orbax(save_sharded(model, root / "hf"), root / "orbax")
    return model, root / "orbax"


def test_a_mistral_with_a_sliding_window_gives_transformers_logits(windowed_mistral):
    model, ckpt = windowed_mistral
    assert load_config(ckpt).sliding_window == WINDOW
    tokens = random_tokens(seq_len=4 * WINDOW)
    diff = np.max(np.abs(_logits(ckpt, tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


def test_the_window_matters_at_this_tolerance(windowed_mistral):
    model, _ = windowed_mistral
    config = transformers.MistralConfig(**{**model.config.to_dict(), "sliding_window": None})
    whole = transformers.MistralForCausalLM(config).eval()
    whole.load_state_dict(model.state_dict())
    tokens = random_tokens(seq_len=4 * WINDOW)
    assert np.max(np.abs(hf_logits(whole, tokens) - hf_logits(model, tokens))) > 100 * LOGIT_ATOL


def test_a_windowed_mistral_exports_as_mistral(windowed_mistral, tmp_path):
    model, ckpt = windowed_mistral
    to_hf(ckpt, tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "MistralForCausalLM"
    assert exported.config.sliding_window == WINDOW
    tokens = random_tokens(seq_len=4 * WINDOW)
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))


def test_a_width_apart_from_heads_times_head_dim_exports_as_a_windowless_mistral(tmp_path):
    # 3 heads of 32 channels in a width of 128: exported as LLaMA, whose config transformers 5
    # refuses (hidden_size must be a multiple of the heads); a Mistral takes it.
    config = ModelConfig.preset("tiny", num_heads=3, num_kv_heads=1, num_layers=1)
    save_model(Llama(config, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "MistralForCausalLM"
    assert exported.config.sliding_window is None
    tokens = random_tokens(seq_len=16)
    diff = np.max(np.abs(_logits(tmp_path / "ckpt", tokens) - hf_logits(exported, tokens)))
    assert diff <= LOGIT_ATOL
    biased = config.replace(qkv_bias=True, o_bias=True)
    with pytest.raises(ConfigError, match=r"d_model=128 not divisible by model\.num_heads=3"):
        config_to_hf(biased)


def test_an_absent_mistral_sliding_window_is_transformers_default():
    hf = _hf_config("MistralConfig", num_key_value_heads=2)
    hf.pop("sliding_window")
    default = transformers.MistralConfig.from_dict(copy.deepcopy(hf)).sliding_window
    assert ModelConfig.from_hf(hf).sliding_window == default == 4096


@pytest.mark.parametrize("key", ["num_key_value_heads", "max_position_embeddings"])
def test_mistral_keys_whose_defaults_differ_from_llama_must_be_there(key):
    # MistralConfig's absent num_key_value_heads is 8, LLaMA's the query heads: it was read as
    # 16 here and failed on the first k_proj tensor's shape.
    hf = _hf_config("MistralConfig", num_key_value_heads=2)
    hf.pop(key)
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("window", [0, "4", True])
def test_a_bad_mistral_sliding_window_is_refused_naming_it(window):
    hf = _hf_config("MistralConfig", num_key_value_heads=2)
    with pytest.raises(ConfigError, match=r"^sliding_window must be"):
        ModelConfig.from_hf({**hf, "sliding_window": window})
