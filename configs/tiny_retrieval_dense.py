"""`tiny_retrieval_dga` with dense causal attention: the replication's baseline.

    python -m dga_jax.eval.synthetic --out runs/retrieval_corpus
    python -m train --config=configs/tiny_retrieval_dense.py --workdir=runs/retrieval_dense

Expected: a validation loss near tiny_retrieval_dga's (0.948 here, 0.974 DGA, 2026-12-02;
benchmarks/RESULTS.md, "Evaluation: the CPU replication").
"""

from __future__ import annotations

from configs import tiny_retrieval_dga


def get_config():
    config = tiny_retrieval_dga.get_config()
    config.model.overrides.attention = "dense"
    config.model.overrides.attention_impl = "blockwise"
    return config
