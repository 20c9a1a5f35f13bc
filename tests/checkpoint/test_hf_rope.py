"""YaRN and llama3 RoPE read as transformers reads them: the same frequencies and cos / sin
scale for every form it computes, the same logits, and errors naming the key for the rest.
Logit parity and export of the YaRN forms run over `CASES` in `test_hf_parity.py`."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dga_jax.checkpoint import load_config, load_model
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig, RopeScaling
from dga_jax.model.layers import rope_frequencies
from tests.checkpoint.conftest import (
    _DEFAULTS,
    LLAMA3_ROPE,
    LOGIT_ATOL,
    YARN_ROPE,
    build_hf_model,
    hf_logits,
    random_tokens,
    save_sharded,
    to_orbax,
)

LLAMA3_NO_ORIGINAL = {
    k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"
}
# case -> top-level config.json changes (max_position_embeddings is 256)
ROPE_FORMS = {
    "yarn": {"rope_scaling": YARN_ROPE},
    "yarn_betas": {"rope_scaling": {**YARN_ROPE, "beta_fast": 8, "beta_slow": 2.0}},
    "yarn_zero_betas_are_defaults": {"rope_scaling": {**YARN_ROPE, "beta_fast": 0, "beta_slow": 0}},
    "yarn_attention_factor": {"rope_scaling": {**YARN_ROPE, "attention_factor": 0.8}},
    "yarn_mscales": {"rope_scaling": {**YARN_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5}},
    "yarn_attention_factor_over_mscales": {
        "rope_scaling": {**YARN_ROPE, "attention_factor": 0.8, "mscale": 1.0, "mscale_all_dim": 0.5}
    },
    "yarn_mscale_alone_is_ignored": {"rope_scaling": {**YARN_ROPE, "mscale": 2.0}},
    "yarn_no_truncate": {"rope_scaling": {**YARN_ROPE, "truncate": False}},
    "yarn_null_truncate_is_false": {"rope_scaling": {**YARN_ROPE, "truncate": None}},
    "yarn_null_factor_is_the_ratio": {"rope_scaling": {**YARN_ROPE, "factor": None}},
    "yarn_factor_below_1": {"rope_scaling": {**YARN_ROPE, "factor": 0.5}},
    "yarn_no_original": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    "yarn_top_level_original_wins": {
        "rope_scaling": {**YARN_ROPE, "original_max_position_embeddings": 64},
        "original_max_position_embeddings": 16,
    },
    "yarn_type_key": {"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_slow": 2}},
    "yarn_head_dim_32_theta": {"rope_scaling": YARN_ROPE, "head_dim": 32, "rope_theta": 5e5},
    "yarn_rope_parameters": {"rope_parameters": {**YARN_ROPE, "rope_theta": 5e5}},
    "llama3_no_original": {"rope_scaling": LLAMA3_NO_ORIGINAL},
    "llama3_top_level_original_wins": {
        "rope_scaling": LLAMA3_ROPE,
        "original_max_position_embeddings": 128,
    },
}


def _hf(changes: dict) -> dict:
    """A tiny LLaMA config.json dict with `changes`, no other RoPE section."""
    return {**transformers.LlamaConfig(**_DEFAULTS).to_dict(), "rope_parameters": None, **changes}


@pytest.mark.parametrize("form", sorted(ROPE_FORMS))
def test_rope_forms_give_transformers_frequencies_and_scale(form):
    hf = _hf(ROPE_FORMS[form])
    theirs = LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(copy.deepcopy(hf)))
    config = ModelConfig.from_hf(hf)
    ours = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_allclose(np.asarray(ours), theirs.inv_freq.numpy(), rtol=1e-6)
    assert config.rope_scaling.attention_scaling == pytest.approx(theirs.attention_scaling)


def test_llama3_without_original_max_position_takes_max_position_embeddings():
    """transformers' standardize_rope_params fills it from max_position_embeddings (and warns
    that it is not below it); it was refused here."""
    config = ModelConfig.from_hf(_hf({"rope_scaling": LLAMA3_NO_ORIGINAL}))
    assert config.rope_scaling == RopeScaling(
        "llama3", 8.0, 1.0, 4.0, _DEFAULTS["max_position_embeddings"]
    )


def test_a_llama3_checkpoint_without_original_max_position_gives_transformers_logits(tmp_path):
    model = build_hf_model(num_key_value_heads=2, rope_scaling=dict(LLAMA3_NO_ORIGINAL))
    hf_dir = save_sharded(model, tmp_path / "hf")
    hf = json.loads((hf_dir / "config.json").read_text())
    del hf["rope_parameters"]["original_max_position_embeddings"]  # transformers saves it filled
    (hf_dir / "config.json").write_text(json.dumps(hf))
    to_orbax(hf_dir, tmp_path / "orbax")
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = random_tokens(seq_len=32)
    ours = np.asarray(load_model(tmp_path / "orbax")(tokens))
    assert np.max(np.abs(ours - hf_logits(reference, tokens))) <= LOGIT_ATOL


def test_yarn_attention_factor_matters_at_the_test_length(converted):
    c = converted("yarn_rope")
    scaling = load_config(c.ckpt_dir).rope_scaling
    assert scaling.attention_scaling > 1.2  # 0.1 ln(8) + 1
    unscaled = dataclasses.replace(scaling, attention_factor=1.0)
    logits = np.asarray(load_model(c.ckpt_dir, rope_scaling=unscaled)(c.tokens))
    assert np.max(np.abs(logits - c.logits)) > 100 * LOGIT_ATOL


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(beta_fast=0.0), r"^rope_scaling\.beta_fast must be > 0, got 0\.0$"),
        (dict(beta_slow=float("nan")), r"^rope_scaling\.beta_slow must be > 0, got nan$"),
        (dict(beta_fast=1.0, beta_slow=2.0), r"^rope_scaling\.beta_fast=1\.0 must be >= rope"),
        (dict(attention_factor=0.0), r"^rope_scaling\.attention_factor must be > 0 or None"),
        (dict(truncate="false"), r"^rope_scaling\.truncate must be a bool, got 'false'$"),
        (dict(original_max_position=0), r"^rope_scaling\.original_max_position must be a posi"),
        (dict(factor=-1.0), r"^rope_scaling\.factor must be > 0, got -1\.0$"),
    ],
)
def test_bad_yarn_values_are_rejected_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**{"kind": "yarn", "factor": 4.0, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"factor": "8"}, r"^rope_scaling\.factor must be float, got str '8'$"),
        ({"beta_fast": "32"}, r"^rope_scaling\.beta_fast must be float, got str '32'$"),
        ({"truncate": "false"}, r"^rope_scaling\.truncate must be bool, got str 'false'$"),
        ({"attention_factor": -1.0}, r"^rope_scaling\.attention_factor must be > 0 or None"),
        ({"mscale": 1.0, "mscale_all_dim": -20.0}, r"^rope_scaling\.mscale=1\.0 and rope_scal"),
        (
            {"original_max_position_embeddings": None},
            r"original_max_position_embeddings must be int",
        ),
    ],
)
def test_bad_hf_yarn_values_are_rejected_by_their_hf_key(changes, match):
    with pytest.raises(ValueError, match=match):  # a ConfigError, or a RopeScaling rule's
        ModelConfig.from_hf(_hf({"rope_scaling": {**YARN_ROPE, **changes}}))


def test_a_yarn_section_without_factor_is_refused_as_transformers_does():
    hf = _hf({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 32}})
    with pytest.raises(KeyError, match="factor"):
        transformers.LlamaConfig.from_dict(copy.deepcopy(hf))
    with pytest.raises(ConfigError, match=r"\['rope_scaling\.factor'\] missing"):
        ModelConfig.from_hf(hf)


def test_yarn_is_set_from_a_dict_as_a_training_override_is():
    rope = {"kind": "yarn", "factor": 8.0, "original_max_position": 4096, "attention_factor": 1}
    config = ModelConfig.from_dict({"rope_scaling": rope})
    assert config.rope_scaling == RopeScaling(
        "yarn", 8.0, original_max_position=4096, attention_factor=1.0
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling\.truncate must be bool"):
        ModelConfig.from_dict({"rope_scaling": {**rope, "truncate": "no"}})
