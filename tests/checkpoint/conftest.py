"""Tiny random `transformers` LLaMA checkpoints, saved sharded, and their converted twins."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dga_jax.checkpoint import load_config, load_model, read_param
from dga_jax.checkpoint.convert import main
from dga_jax.checkpoint.hf_weights import weights

SEQ_LEN = 80  # past the llama3 case's original_max_position_embeddings (64)
LOGIT_ATOL = 1e-4  # float32 logits, ours vs transformers; fixed, never loosened
SHARD_SIZE = "40KB"  # forces several shards (and an index) for these tiny models
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# YaRN as Yarn-Llama-2 sets it (factor = max_position_embeddings / original); the test length is
# past original_max_position_embeddings, so the ramp and the attention factor both matter.
YARN_ROPE = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
# LongRoPE on LLaMA (Phi-3's scaling): one divisor per frequency (head_dim 16: 8), below the
# original context and past it; the test length is past it, so the long factors and the
# attention factor (from max_position_embeddings / 64) both matter.
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5],
    "long_factor": [1.0, 1.3, 1.9, 2.8, 4.0, 6.5, 9.0, 12.0],
    "original_max_position_embeddings": 64,
}
# dynamic NTK past max_position_embeddings (64 here, below the test length)
DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 4.0}
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "linear_rope": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3_rope": dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE, rope_theta=50000.0),
    "yarn_rope": dict(num_key_value_heads=2, rope_scaling=YARN_ROPE),
    "yarn_rope_attention_factor": dict(
        num_key_value_heads=2,
        rope_scaling={**YARN_ROPE, "factor": 4.0, "attention_factor": 0.8, "beta_fast": 16.0},
    ),
    # DeepSeek's form: the attention factor is the ratio of the two mscales' YaRN scales
    "yarn_rope_mscale": dict(
        num_key_value_heads=2,
        rope_scaling={**YARN_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5},
        rope_theta=50000.0,
    ),
    "yarn_rope_no_truncate": dict(
        num_key_value_heads=4, rope_scaling={**YARN_ROPE, "truncate": False}
    ),
    "dynamic_rope": dict(
        num_key_value_heads=2, rope_scaling=DYNAMIC_ROPE, max_position_embeddings=64
    ),
    "longrope": dict(num_key_value_heads=2, rope_scaling=LONGROPE),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
}
_DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer float32 LLaMA (d=64, 4 heads, I=96, V=128) with random weights, norms included."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**_DEFAULTS, **overrides})).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return model


def save_sharded(model: LlamaForCausalLM, path: pathlib.Path) -> pathlib.Path:
    """`save_pretrained` into several safetensors shards plus `model.safetensors.index.json`."""
    model.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD_SIZE)
    return path


def to_orbax(hf_dir: pathlib.Path, out: pathlib.Path, *flags: str) -> None:
    """`hf-to-orbax` through the command line's entry function."""
    main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(out), *flags])


def to_hf(ckpt: pathlib.Path, out: pathlib.Path, *flags: str) -> None:
    """`orbax-to-hf` through the command line's entry function."""
    main(["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(out), *flags])


def assert_same_params(ckpt: pathlib.Path, expected_ckpt: pathlib.Path) -> None:
    """Two Orbax checkpoints hold bit-identical parameters."""
    for weight in weights(load_config(expected_ckpt)):
        actual, expected = read_param(ckpt, weight.path), read_param(expected_ckpt, weight.path)
        np.testing.assert_array_equal(actual, expected, str(weight.path))


def random_tokens(seed: int = 0, batch: int = 2, seq_len: int = SEQ_LEN) -> np.ndarray:
    """Token ids [batch, seq_len] below the tiny vocabulary (128)."""
    return np.random.default_rng(seed).integers(0, 128, (batch, seq_len), dtype=np.int32)


def hf_logits(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of a `transformers` model."""
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def conversions(tmp_path_factory, build: Callable[[str], torch.nn.Module]):
    """name -> (transformers model `build(name)`, its Orbax conversion dir; the sharded HF
    checkpoint beside it, "hf"), each built on first use: a module's `converted` fixture."""
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = build(name)
            to_orbax(save_sharded(model, root / "hf"), root / "orbax")
            cache[name] = model, root / "orbax"
        return cache[name]

    return get


def converted_logits(ckpt_dir, tokens: np.ndarray, **changes) -> np.ndarray:
    """float32 logits [B, T, V] of an Orbax conversion, loaded in float32 with `changes`."""
    return np.asarray(load_model(ckpt_dir, param_dtype="float32", **changes)(tokens))


def assert_decodes_as_it_runs_whole(model) -> None:
    """A converted model's prefill of 16 tokens and 8 decode steps give the logits of its run
    over all 24 (dense attention, or DGA whose selection is causal: streaming)."""
    tokens = jnp.asarray(random_tokens(seq_len=24))
    whole = model(tokens)
    logits, caches = model.prefill(tokens[:, :16], 24)
    steps = [logits[:, -1]]
    for t in range(16, 24):
        step, caches = model.decode_step(tokens[:, t], caches)
        steps.append(step)
    np.testing.assert_allclose(jnp.stack(steps, 1), whole[:, 15:], atol=LOGIT_ATOL)


@dataclasses.dataclass(frozen=True)
class Converted:
    """A HF checkpoint, its conversion by `hf-to-orbax`, and the reference logits."""

    model: LlamaForCausalLM
    hf_dir: pathlib.Path
    ckpt_dir: pathlib.Path
    tokens: np.ndarray  # [B, T]
    logits: np.ndarray  # [B, T, V], from transformers


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """case name -> `Converted`, built once per session on first use."""
    cache: dict[str, Converted] = {}

    def get(case: str) -> Converted:
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            model = build_hf_model(**CASES[case])
            hf_dir = save_sharded(model, root / "hf")
            to_orbax(hf_dir, root / "orbax")
            tokens = random_tokens()
            cache[case] = Converted(model, hf_dir, root / "orbax", tokens, hf_logits(model, tokens))
        return cache[case]

    return get
