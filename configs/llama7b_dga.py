"""The paper's recipe: continued pretraining of LLaMA2-7B with DGA at 8K on SlimPajama.

    python -m dga_jax.checkpoint.convert hf-to-orbax --hf_dir Llama-2-7b-hf --out ckpt/llama2-7b
    python -m train --config=configs/llama7b_dga.py --workdir=runs/llama7b_dga \\
        --config.init_checkpoint=ckpt/llama2-7b --config.data.train='SlimPajama-627B/train' \\
        --config.data.validation='SlimPajama-627B/validation' \\
        --config.data.tokenizer=Llama-2-7b-hf/tokenizer.model

LongLoRA's full fine-tune recipe (docs/PAPER_NOTES.md): 8K sequences, global batch 64
(micro-batch 1 per device on 8 devices x accumulation 8), lr 2e-5 with 20 warmup steps then
constant, weight decay 0, AdamW with betas (0.9, 0.999) and clipping at 1 (the Hugging Face
Trainer's defaults, which LongLoRA keeps), bf16 compute with float32 master weights, linear RoPE
scaling factor 2, 1000 steps (~0.52B tokens), FSDP over all devices (set `--config.mesh.seq` to
shard long sequences).
On GPUs the default attention runs DGA's Triton kernels (bf16 inputs placed on GPUs pick
"pallas_gpu"); elsewhere "xla", and on TPUs `--config.model.overrides.attention_impl=pallas_tpu`
runs the Mosaic kernels (not yet run on a TPU).
Expected (paper): LongBench-E average about 21 vs 21.7 for dense attention.
"""

from __future__ import annotations

from ml_collections import config_dict

from configs import base


def get_config():
    config = base.get_config()
    config.model.preset = "llama2_7b"
    config.model.overrides.update(
        {
            "attention": "dga",
            "dga": {"group_size": 16, "focal_ratio": 0.1, "selection": "global"},
            "rope_scaling": {"kind": "linear", "factor": 2.0},
            "max_position": 8192,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat": "save_dots_no_batch",
        }
    )
    # Required on the command line (a 7B run never falls back to the sample corpus or to
    # random weights): left unset, the launch stops at once, naming each of them.
    config.init_checkpoint = config_dict.placeholder(str)
    config.data.train = config_dict.placeholder(str)
    config.data.validation = config_dict.placeholder(str)
    config.data.tokenizer = config_dict.placeholder(str)
    config.data.seq_len = 8192
    config.mesh.fsdp = -1
    config.optim.learning_rate = 2e-5
    config.optim.warmup_steps = 20
    config.optim.schedule = "constant"
    config.optim.weight_decay = 0.0
    config.optim.b2 = 0.999
    config.train.steps = 1000
    config.train.global_batch_size = 64
    config.train.grad_accum_steps = 8
    config.train.log_every = 1
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.train.loss_chunks = 8  # logits 1K tokens at a time: 1.9 GiB less per H100 (RESULTS.md)
    return config
