"""The deviceless target compiles run at the compilers' full optimization (the root conftest
turns most of it off for the rest of the suite): register spills, shared memory and VMEM are
checked as a user's compile would produce them."""

from __future__ import annotations

import jax
import pytest

from tests.conftest import FEW_OPTIMIZATIONS


@pytest.fixture(autouse=True)
def _full_optimization():
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", FEW_OPTIMIZATIONS)
