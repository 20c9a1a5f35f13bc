"""Logical-axis rules: a logical name the rules do not list is an error, never replicated."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec

from dga_jax.sharding import DEFAULT_RULES, LogicalRules


def test_a_name_missing_from_the_rules_is_refused_not_replicated():
    # A typo in a user's rules ("kv_head") would otherwise leave the KV projections whole on
    # every tensor device.
    typo = LogicalRules(
        tuple(("kv_head" if n == "kv_heads" else n, a) for n, a in DEFAULT_RULES.rules)
    )
    with pytest.raises(ValueError, match=r"\['kv_heads'\] not in the rules"):
        typo.spec(("embed", "kv_heads", "head_dim"))
    with pytest.raises(ValueError, match=r"\['sequence'\] not in the rules"):
        DEFAULT_RULES.spec(("batch", "sequence", "act_embed"))
    # Listed names (None included) and unnamed dimensions still map as before.
    assert DEFAULT_RULES.spec(("batch", "seq", "head_dim", None)) == PartitionSpec(
        ("data", "fsdp"), "seq", None, None
    )
