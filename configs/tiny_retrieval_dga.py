"""The CPU replication: the tiny DGA model at 2K context on code mixed with retrieval documents.

    python -m dga_jax.eval.synthetic --out runs/retrieval_corpus
    python -m train --config=configs/tiny_retrieval_dga.py --workdir=runs/retrieval_dga

The corpus is the sample corpus (Python sources) with passkey- and lines-style documents in
the evaluation's formats, other fillers and ids (`dga_jax.eval.synthetic`). 600 steps of
4 x 2048 byte tokens (many small steps: retrieval is learnt in a phase change, after a number
of steps more than of tokens), about 10 minutes on 2 CPU cores.
`benchmarks/eval_replication.py` runs the whole comparison (both models, every evaluation,
attention swapped) and writes its tables. Expected: a validation loss of about 0.97 at step 600
(dense: 0.95; benchmarks/RESULTS.md, "Evaluation: the CPU replication", 2026-12-02).
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
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 30
    config.train.global_batch_size = 4
    config.train.steps = 600
    config.train.eval_every = 200
    config.train.eval_batches = 4
    config.train.checkpoint_every = 200
    return config
