"""Converted HF checkpoints give `transformers`' logits, and export back to what it loads."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import GenerationConfig, LlamaForCausalLM

from dga_jax.checkpoint import load_config, load_model
from dga_jax.checkpoint.hf import read_hf_config
from dga_jax.errors import InputError
from dga_jax.model.config import RopeScaling
from dga_jax.ops.dga.config import DGAConfig
from tests.checkpoint.conftest import (
    CASES,
    LOGIT_ATOL,
    SHARD_SIZE,
    build_hf_model,
    hf_logits,
    save_sharded,
    to_hf,
    to_orbax,
)


def logits_of(ckpt_dir, tokens: np.ndarray, **config_changes) -> np.ndarray:
    """float32 logits [B, T, V] of the converted model, loaded onto the default device."""
    model = load_model(ckpt_dir, **config_changes)
    return np.asarray(model(jnp.asarray(tokens)))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(converted, case):
    c = converted(case)
    diff = max_diff(logits_of(c.ckpt_dir, c.tokens), c.logits)
    print(f"{case}: max |ours - transformers| = {diff:.2e}")
    assert diff <= LOGIT_ATOL


@pytest.mark.parametrize(
    "case", ["linear_rope", "llama3_rope", "yarn_rope", "dynamic_rope", "longrope"]
)
def test_rope_scaling_matters_at_the_test_length(converted, case):
    c = converted(case)
    unscaled = logits_of(c.ckpt_dir, c.tokens, rope_scaling=RopeScaling())
    assert max_diff(unscaled, c.logits) > 100 * LOGIT_ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_the_same_logits(converted, case, tmp_path):
    c = converted(case)
    out = tmp_path / "hf"
    to_hf(c.ckpt_dir, out, "--max_shard_size", SHARD_SIZE)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    exported = LlamaForCausalLM.from_pretrained(out).eval()
    assert exported.config.tie_word_embeddings == c.model.config.tie_word_embeddings
    diff = max_diff(hf_logits(exported, c.tokens), c.logits)
    print(f"{case}: max |exported - original| = {diff:.2e}")
    assert diff <= LOGIT_ATOL


def test_dga_with_every_token_focal_equals_dense(converted):
    c = converted("gqa")
    dga = logits_of(c.ckpt_dir, c.tokens, attention="dga", dga=DGAConfig(16, 1.0))
    diff = max_diff(dga, c.logits)
    print(f"dga focal_ratio=1: max |dga - transformers| = {diff:.2e}")
    assert diff <= LOGIT_ATOL


def test_dga_with_groups_differs_from_dense(converted):
    c = converted("gqa")
    dga = logits_of(c.ckpt_dir, c.tokens, attention="dga", dga=DGAConfig(16, 0.1))
    assert max_diff(dga, c.logits) > 100 * LOGIT_ATOL


def test_generate_stops_at_the_same_ids_after_a_round_trip(tmp_path):
    """transformers' `generate` reads generation_config.json's ids, which may list more eos ids
    than config.json (Llama-3-Instruct: [128001, 128009]) and a pad id config.json lacks."""
    model = build_hf_model(num_key_value_heads=2, bos_token_id=1, eos_token_id=9)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[7, 9], pad_token_id=3)
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    config = load_config(tmp_path / "orbax")
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (7, 9), 3)
    to_hf(tmp_path / "orbax", tmp_path / "exported")
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "exported").generation_config
    assert (exported.bos_token_id, exported.eos_token_id, exported.pad_token_id) == (1, [7, 9], 3)


def test_a_bad_generation_config_is_named(tmp_path):
    hf_dir = save_sharded(build_hf_model(num_key_value_heads=2), tmp_path / "hf")
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(InputError, match=r"generation_config\.json: eos_token_id must be int"):
        read_hf_config(hf_dir)
