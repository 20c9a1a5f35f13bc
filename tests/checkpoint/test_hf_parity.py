"""Converted HF checkpoints give `transformers`' logits, and export back to what it loads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaForCausalLM

from dga_jax.checkpoint import load_model
from dga_jax.model.config import RopeScaling
from dga_jax.ops.dga.config import DGAConfig
from tests.checkpoint.conftest import CASES, LOGIT_ATOL, SHARD_SIZE, hf_logits, to_hf


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


@pytest.mark.parametrize("case", ["linear_rope", "llama3_rope"])
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
