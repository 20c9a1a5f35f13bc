"""Guard for e134d20 (RMSNorm's weight gradient: the rows' dot in x's dtype). Asked for in float32
from bfloat16 rows, XLA:TPU kept float32 copies of every layer's rows in the train step
(LLaMA2-7B on a v5p-8: 334 MiB more per layer, benchmarks/RESULTS.md). A small bfloat16 model's
v5p step shows it in how much its temporaries grow per layer."""

from __future__ import annotations

import pytest

from configs import base
from dga_jax import aot
from train.config import from_config_dict
from train.setup import lower_train_step

pytestmark = pytest.mark.aot

MIB = 2**20
# This step's temporaries per layer (3 layers less 1, halved), measured with the aot extra's
# libtpu: 203.2 MiB with the dot in x's dtype (e134d20), 273.3 MiB with it in float32 (before).
PER_LAYER_LIMIT_MIB = 238


def _temp_bytes(num_layers: int) -> int:
    """Temporaries per device of the v5p step: 2 rows of 8K tokens on each of 4 chips (FSDP)."""
    config = base.get_config()
    config.model.overrides.update(
        dict(
            attention="dense",
            attention_impl="blockwise",
            dtype="bfloat16",
            param_dtype="float32",
            remat="save_dots_no_batch",  # the 7B recipe's
            num_layers=num_layers,
            d_model=256,
            intermediate_size=688,
            num_heads=2,
            num_kv_heads=2,
            head_dim=128,
            vocab_size=512,
        )
    )
    config.data.seq_len = 8192
    config.train.global_batch_size = 8
    lowered = lower_train_step(from_config_dict(config), aot.target_devices("v5p", chips=4))
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_bfloat16_rows_get_no_float32_copy_per_layer():
    per_layer = (_temp_bytes(3) - _temp_bytes(1)) / 2 / MIB
    assert per_layer < PER_LAYER_LIMIT_MIB, (
        f"the v5p step's temporaries grow {per_layer:.1f} MiB per layer (203.2 with e134d20): "
        "float32 copies of the layers' rows again?"
    )
