"""The reference and the XLA walk against the spec read a second time (`spec_oracle`): lengths
below, at and past m with leftovers, r = 0, 1, L - 1 and L, m = 1, GQA, a batch of two."""

from __future__ import annotations

import numpy as np
import pytest

import dga_jax
from dga_jax import BlockSizes
from tests.conftest import random_qkv
from tests.ops.spec_oracle import spec_attention

# (L, m, gamma): r = ceil(gamma L) from 0 to L; L < m, L = m, leftovers; m = 1.
CASES = [
    (1, 4, 0.1),
    (3, 4, 0.5),
    (4, 4, 0.0),
    (5, 4, 0.3),
    (9, 4, 0.1),
    (10, 3, 0.9),
    (13, 4, 0.99),
    (16, 5, 1.0),
    (21, 4, 0.5),
    (10, 1, 0.1),
    (12, 5, 0.8),
]
IMPLEMENTATIONS = {
    "reference": dict(implementation="reference"),
    "xla": dict(implementation="xla"),
    "xla-tiny-blocks": dict(implementation="xla", block_sizes=BlockSizes(3, 2, 2, 3, 1)),
}


@pytest.mark.parametrize("selection", ["global", "streaming"])
@pytest.mark.parametrize("length, m, gamma", CASES)
def test_implementations_compute_the_spec(length, m, gamma, selection):
    q, k, v = random_qkv(length * 100 + m, 2, length, 4, 2, 4)
    want = spec_attention(q, k, v, m, gamma, selection)
    for name, kwargs in IMPLEMENTATIONS.items():
        got = dga_jax.dga_attention(
            q, k, v, group_size=m, focal_ratio=gamma, selection=selection, **kwargs
        )
        error = np.max(np.abs(np.asarray(got, np.float64) - want))
        assert error < 1e-5, f"{name}: {error:.2e} from the spec"


def test_the_oracle_is_dense_causal_attention_when_nothing_is_grouped():
    # gamma = 1 (every token focal) and m = 1 (every group one token) are dense causal
    # attention by the spec: the oracle's own check, against a direct softmax.
    q, k, v = (np.asarray(x, np.float64) for x in random_qkv(7, 1, 9, 2, 1, 4))
    logits = np.einsum("bthd,bsd->bhts", q, k[:, :, 0]) / 2.0
    logits = np.where(np.tril(np.ones((9, 9), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    dense = np.einsum("bhts,bsd->bthd", p / p.sum(-1, keepdims=True), v[:, :, 0])
    for selection in ("global", "streaming"):
        for m, gamma in ((4, 1.0), (1, 0.3)):
            got = spec_attention(q, k, v, m, gamma, selection)
            np.testing.assert_allclose(got, dense, atol=1e-12)
