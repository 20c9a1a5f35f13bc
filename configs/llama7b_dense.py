"""`llama7b_dga` with dense causal attention (cuDNN on GPU): the paper's baseline.

    python -m train --config=configs/llama7b_dense.py --workdir=runs/llama7b_dense \\
        --config.init_checkpoint=ckpt/llama2-7b --config.data.train='SlimPajama-627B/train' \\
        --config.data.validation='SlimPajama-627B/validation' \\
        --config.data.tokenizer=Llama-2-7b-hf/tokenizer.model

Expected (paper): LongBench-E average about 21.7.
"""

from __future__ import annotations

from configs import llama7b_dga


def get_config():
    config = llama7b_dga.get_config()
    config.model.overrides.attention = "dense"
    return config
