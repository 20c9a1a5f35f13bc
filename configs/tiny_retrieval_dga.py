"""The CPU replication: the tiny DGA model at 2K context on code mixed with retrieval documents.

    python -m dga_jax.eval.synthetic --out runs/retrieval_corpus
    python -m train --config=configs/tiny_retrieval_dga.py --workdir=runs/retrieval_dga

The corpus is the sample corpus (Python sources) with passkey- and lines-style documents in
the evaluation's formats, other fillers and ids (`dga_jax.eval.synthetic`). 240 steps of
8 x 2048 byte tokens, about 8 minutes on 2 CPU cores. `benchmarks/eval_replication.py` runs the
whole comparison (both models, every evaluation, attention swapped) and writes its tables.
"""

from __future__ import annotations

from configs import tiny_dga

CORPUS = "runs/retrieval_corpus"


def get_config():
    config = tiny_dga.get_config()
    config.model.overrides.max_position = 2048
    config.data.train = f"{CORPUS}/train"
    config.data.validation = f"{CORPUS}/validation"
    config.data.seq_len = 2048
    config.optim.learning_rate = 2e-3
    config.train.steps = 240
    config.train.eval_every = 80
    config.train.eval_batches = 2
    config.train.checkpoint_every = 80
    return config
