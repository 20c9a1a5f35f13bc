"""A 75M-parameter DGA model trained at 32K tokens, each sequence split over every device:
the preset of `colab/long_context_tpu.ipynb`, sized for a Colab TPU v2-8 (8 cores, 8 GiB each).

    python -m train --config=configs/long_context_tpu_dga.py --workdir=runs/long_context_tpu_dga

`mesh.seq = -1` splits each 32K-token sequence over all devices (4K tokens per core on a v2-8),
zig-zag ordered to balance causal work; with 4 KV heads, Ulysses needs at most 4 parts, so on
8 cores the "auto" strategy is "dga" (README, "Long sequences across devices"). Parameters and
AdamW state are sharded over the same devices. bfloat16 compute, float32 weights, full
rematerialisation. Trains on the byte-level sample corpus (no download); for SlimPajama set
`--config.data.train`, `--config.data.validation` (both or neither), `--config.data.tokenizer`
and `--config.model.overrides.vocab_size`.
The first loss is about ln 512 = 6.2 (uniform over the byte vocabulary).
"""

from __future__ import annotations

from configs import base


def get_config():
    config = base.get_config()
    config.model.overrides.update(
        {
            "attention": "dga",
            "dga": {"group_size": 16, "focal_ratio": 0.1, "selection": "global"},
            "d_model": 768,
            "num_layers": 12,
            "num_heads": 12,
            "num_kv_heads": 4,
            "head_dim": 64,
            "intermediate_size": 2048,
            "max_position": 32768,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat": "full",
        }
    )
    config.data.seq_len = 32768
    config.mesh.fsdp = 1
    config.mesh.seq = -1
    config.mesh.context_order = "zigzag"
    config.optim.learning_rate = 1e-3
    config.train.steps = 200
    config.train.global_batch_size = 4
    config.train.log_every = 5
    config.train.eval_every = 100
    config.train.eval_batches = 2
    config.train.checkpoint_every = 100
    return config
