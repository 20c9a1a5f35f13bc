"""RoPE whose frequencies follow the sequence length (dynamic NTK, LongRoPE) as transformers
computes them: per call from the longest position, here per row; decoding across the original
context as transformers' cached decoding; and errors naming the key. Logit parity and export
of both run over `CASES` ("dynamic_rope", "longrope") in `test_hf_parity.py`."""

from __future__ import annotations

import copy
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dga_jax.checkpoint import load_model
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig, RopeScaling
from dga_jax.model.hf_config import config_to_hf
from dga_jax.model.hf_rope import hf_rope_scaling
from dga_jax.model.layers import rope_frequencies
from tests.checkpoint.conftest import (
    _DEFAULTS,
    DYNAMIC_ROPE,
    LOGIT_ATOL,
    LONGROPE,
    hf_logits,
    random_tokens,
)

# form -> top-level config.json changes; each form's original context is 64
FORMS = {
    "dynamic": {"rope_scaling": DYNAMIC_ROPE, "max_position_embeddings": 64},
    "dynamic_factor_2": {
        "rope_scaling": {**DYNAMIC_ROPE, "factor": 2},
        "max_position_embeddings": 64,
    },
    "longrope": {"rope_scaling": LONGROPE},
    "longrope_factor": {"rope_scaling": {**LONGROPE, "factor": 8.0}},
    "longrope_attention_factor": {"rope_scaling": {**LONGROPE, "attention_factor": 0.9}},
    "longrope_top_level_original": {
        "rope_scaling": {
            k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"
        },
        "original_max_position_embeddings": 64,
    },
}
LENGTHS = (1, 63, 64, 65, 200, 1000)


def _hf(changes: dict) -> dict:
    """A tiny LLaMA config.json dict with `changes`, no other RoPE section."""
    return {**transformers.LlamaConfig(**_DEFAULTS).to_dict(), "rope_parameters": None, **changes}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_frequencies_follow_the_length_as_transformers(form, length):
    hf = _hf(FORMS[form])
    # a fresh module per call: transformers' dynamic NTK keeps the longest length it has seen
    theirs = LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(copy.deepcopy(hf)))
    theirs(torch.zeros(1, length, 8), torch.arange(length)[None])
    config = ModelConfig.from_hf(hf)
    ours = rope_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling, jnp.asarray([length])
    )
    np.testing.assert_allclose(np.asarray(ours)[0], theirs.inv_freq.numpy(), rtol=1e-6)
    assert config.rope_scaling.attention_scaling == pytest.approx(theirs.attention_scaling)


@pytest.mark.parametrize("form", ["dynamic", "longrope"])
def test_the_length_matters_past_the_original_context_only(form):
    scaling = ModelConfig.from_hf(_hf(FORMS[form])).rope_scaling

    def frequencies(length):
        return np.asarray(rope_frequencies(16, 10000.0, scaling, jnp.asarray(length)))

    np.testing.assert_array_equal(frequencies(1), frequencies(64))
    assert np.max(np.abs(frequencies(65) / frequencies(64) - 1)) > 0.01
    np.testing.assert_array_equal(frequencies(64), rope_frequencies(16, 10000.0, scaling))


def _loaded(converted, case: str):
    """(our model, a fresh transformers model: dynamic NTK's state is its history)."""
    c = converted(case)
    fresh = transformers.LlamaForCausalLM.from_pretrained(c.hf_dir).eval()
    return load_model(c.ckpt_dir), fresh


@pytest.mark.parametrize("case", ["dynamic_rope", "longrope"])
def test_right_padded_rows_rotate_at_their_own_length(converted, case):
    """Rows of 40 and 80 tokens (the original context is 64) prefilled together: each row's
    logits are transformers' for that row alone, the short row's with the short frequencies
    though the batch is 80 wide."""
    ours, theirs = _loaded(converted, case)
    tokens = random_tokens(seq_len=80)
    logits, _ = ours.prefill(jnp.asarray(tokens), 96, lengths=jnp.asarray([40, 80]))
    for row, length in enumerate((40, 80)):
        alone = hf_logits(theirs, tokens[row : row + 1, :length])[0]
        diff = np.max(np.abs(np.asarray(logits)[row, :length] - alone))
        assert diff <= LOGIT_ATOL, (row, diff)


def test_the_short_row_would_differ_at_the_batch_length(converted):
    """The test above is sharp: the 40-token row rotated as 80 tokens long moves its logits."""
    ours, theirs = _loaded(converted, "longrope")
    tokens = random_tokens(seq_len=80)
    logits, _ = ours.prefill(jnp.asarray(tokens), 96)  # both rows 80 long
    alone = hf_logits(theirs, tokens[:1, :40])[0]
    assert np.max(np.abs(np.asarray(logits)[0, :40] - alone)) > 100 * LOGIT_ATOL


@pytest.mark.parametrize("case", ["dynamic_rope", "longrope"])
def test_decoding_across_the_original_context_follows_transformers(converted, case):
    """A 56-token prompt decoded to 72 tokens, one token at a time: each step's frequencies are
    those of its length (the keys cached before keep theirs), as transformers decodes."""
    ours, theirs = _loaded(converted, case)
    tokens = random_tokens(seq_len=72)[:1]
    logits, caches = ours.prefill(jnp.asarray(tokens[:, :56]), 72, last_only=True)
    steps = [np.asarray(logits)[:, -1]]
    for t in range(56, 71):
        step, caches = ours.decode_step(jnp.asarray(tokens[:, t]), caches)
        steps.append(np.asarray(step))
    with torch.no_grad():
        out = theirs(torch.from_numpy(tokens[:, :56]).long(), use_cache=True)
        expected = [out.logits[:, -1].numpy()]
        for t in range(56, 71):
            token = torch.from_numpy(tokens[:, t : t + 1]).long()
            out = theirs(token, cache=out.past_key_values, use_cache=True)
            expected.append(out.logits[:, -1].numpy())
    diff = np.max(np.abs(np.stack(steps) - np.stack(expected)))
    assert diff <= LOGIT_ATOL
    # and decoding is not the whole sequence's forward: the early keys keep their frequencies
    whole = hf_logits(theirs, tokens[:, :71])[:, 55:]
    assert np.max(np.abs(np.stack(steps, 1) - whole)) > 100 * LOGIT_ATOL


def test_dynamic_ntk_extends_max_position_by_its_factor_and_exports_the_original():
    config = ModelConfig.from_hf(_hf(FORMS["dynamic"]))
    assert config.max_position == 256
    assert config.rope_scaling == RopeScaling("dynamic", 4.0, original_max_position=64)
    hf = config_to_hf(config)
    assert hf["max_position_embeddings"] == 64
    assert hf["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0}


def test_phi3_legacy_names_are_longrope():
    """transformers' Phi3Config reads rope types "su" and "yarn" as longrope."""
    for legacy in ("su", "yarn"):
        hf = _hf({"model_type": "phi3", "rope_scaling": {**LONGROPE, "type": legacy}})
        del hf["rope_scaling"]["rope_type"]
        scaling = hf_rope_scaling(hf)
        assert scaling.kind == "longrope"
        assert scaling.long_factor == tuple(LONGROPE["long_factor"])


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"short_factor": [1.0] * 7}, r"^rope_scaling kind 'longrope' needs short_factor and lo"),
        ({"long_factor": [1.0, 0.0] * 4}, r"^rope_scaling\.long_factor must hold numbers > 0"),
        ({"attention_factor": -1.0}, r"^rope_scaling\.attention_factor must be > 0 or None"),
    ],
)
def test_bad_longrope_values_are_rejected_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(_hf({"rope_scaling": {**LONGROPE, **changes}}))


def test_longrope_factors_must_match_the_head_dim():
    rope = {k: v for k, v in LONGROPE.items() if k != "rope_type"}
    rope["short_factor"] = rope["long_factor"] = [1.0] * 4
    with pytest.raises(ValueError, match=r"hold 4 factors each; longrope needs one per frequen"):
        ModelConfig.from_hf(_hf({"rope_scaling": {"rope_type": "longrope", **rope}}))


@pytest.mark.parametrize("key", ["short_factor", "long_factor"])
def test_a_longrope_section_without_its_factors_is_refused_naming_them(key):
    rope = {k: v for k, v in LONGROPE.items() if k != key}
    with pytest.raises(ConfigError, match=rf"\['rope_scaling\.{key}'\] missing"):
        ModelConfig.from_hf(_hf({"rope_scaling": rope}))


def test_dynamic_without_factor_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"\['rope_scaling\.factor'\] missing"):
        ModelConfig.from_hf(_hf({"rope_scaling": {"rope_type": "dynamic"}}))


def test_factor_lists_belong_to_longrope_only():
    with pytest.raises(ValueError, match=r"short_factor and long_factor are longrope's"):
        RopeScaling("yarn", 4.0, short_factor=(1.0,), long_factor=(1.0,))


def test_longrope_is_set_from_a_dict_as_a_training_override_is():
    rope = {
        "kind": "longrope",
        "factor": 4.0,
        "original_max_position": 64,
        "short_factor": LONGROPE["short_factor"],
        "long_factor": LONGROPE["long_factor"],
    }
    config = ModelConfig.from_dict({"head_dim": 16, "rope_scaling": rope})
    assert config.rope_scaling.short_factor == tuple(LONGROPE["short_factor"])
    assert ModelConfig.from_dict(config.to_dict()) == config
    hash(config)  # a static argument of jit
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling\.long_factor must be a tuple"):
        ModelConfig.from_dict({"head_dim": 16, "rope_scaling": {**rope, "long_factor": 2.0}})


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"rope_scaling": LONGROPE, "original_max_position_embeddings": 0}, ""),
        ({"rope_scaling": {**LONGROPE, "original_max_position_embeddings": 0}}, "rope_scaling."),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 0},
            "",
        ),
    ],
    ids=["longrope_top_level", "longrope_section", "dynamic"],
)
def test_a_context_of_zero_is_refused_naming_its_key(changes, key):
    """The scalings divide by it: a named error, not a ZeroDivisionError without the file."""
    name = "max_position_embeddings" if "factor" in changes["rope_scaling"] else "original_max"
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}{name}\w* must be >= 1"):
        ModelConfig.from_hf(_hf(changes))


def test_dynamic_ntk_needs_more_than_two_rotated_channels():
    dynamic = RopeScaling("dynamic", 2.0, original_max_position=64)
    with pytest.raises(ValueError, match=r"'dynamic' rotates 2 channels of each head"):
        ModelConfig.preset("tiny", rope_scaling=dynamic, rotary_dim=2)
    ModelConfig.preset("tiny", rope_scaling=dynamic, rotary_dim=4)
