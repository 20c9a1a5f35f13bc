"""The embedded default: a tiny Llama with DGA, trained on a sample corpus built on the spot.

    python -m train --config=configs/tiny_dga.py --workdir=/tmp/tiny_dga

Runs on a 2-core CPU in a few minutes: builds a SlimPajama-format corpus from the Python
standard library's sources (byte-level tokenizer), trains 200 steps of 8 x 256 tokens, and
writes metrics, checkpoints and a loss plot to the workdir. Expected: the loss starts near
ln 512 = 6.2 (uniform over the preset's 512 ids); the validation loss, evaluated every 50 steps,
ends below 3 at step 200.
"""

from __future__ import annotations

from configs import base


def get_config():
    config = base.get_config()
    config.model.overrides.attention = "dga"
    config.model.overrides.dga = {"group_size": 16, "focal_ratio": 0.1, "selection": "global"}
    return config
