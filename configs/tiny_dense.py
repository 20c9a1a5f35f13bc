"""`tiny_dga` with dense causal attention: the baseline for the embedded default.

    python -m train --config=configs/tiny_dense.py --workdir=/tmp/tiny_dense

Expected: a validation loss curve close to tiny_dga's (DGA at m=16, gamma=0.1 costs little
quality at this length).
"""

from __future__ import annotations

from configs import tiny_dga


def get_config():
    config = tiny_dga.get_config()
    config.model.overrides.attention = "dense"
    config.model.overrides.attention_impl = "blockwise"
    return config
