"""Static DGA hyper-parameters and the sizes they imply for a sequence length.

Every count here is a Python int known at trace time, so layouts, caches and kernels have
static shapes. The rules are those of `docs/DGA_SPEC.md`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from dga_jax.ops.checks import is_int, is_real

SELECTIONS = ("global", "streaming")
INT32_MAX = 2**31 - 1


def ceil_exact(x: float) -> int:
    """`ceil` in exact arithmetic: float noise (0.1 * 30 = 3.0000000000000004) adds no token."""
    return math.ceil(x - 1e-6)


@dataclasses.dataclass(frozen=True)
class DGAConfig:
    """DGA hyper-parameters: group size m, focal ratio gamma and the selection rule."""

    group_size: int = 16
    focal_ratio: float = 0.1
    selection: str = "global"

    def __post_init__(self):
        m = _concrete("group_size", self.group_size)
        gamma = _concrete("focal_ratio", self.focal_ratio)
        if not is_int(m) or m < 1:
            raise ValueError(f"dga.group_size must be an int >= 1, got {m!r}")
        if not is_real(gamma) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"dga.focal_ratio must be a number in [0, 1], got {gamma!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"dga.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if isinstance(gamma, np.floating):
            # The decimal a NumPy float stands for: float32's 0.1 is 0.10000000149, whose excess
            # over 0.1 outgrows `ceil_exact`'s slack (one more focal token) from gamma L ~ 100.
            gamma = np.format_float_positional(gamma, unique=True)
        # Plain Python numbers: the config is a static (hashed) argument of jitted functions.
        object.__setattr__(self, "group_size", int(m))
        object.__setattr__(self, "focal_ratio", float(gamma))
        width = self.group_size if self.focal_ratio >= 1.0 else self.chunk_size
        if width > INT32_MAX:  # positions, counts and shapes are int32
            raise ValueError(
                f"dga.group_size={m} with focal_ratio={gamma} makes groups or chunks of {width} "
                f"tokens, past int32 (focal_ratio=1 keeps every token, with no chunks)"
            )

    @property
    def chunk_focal(self) -> int:
        """r' = ceil(gamma m / (1 - gamma)): tail tokens promoted to focal at each flush."""
        if self.focal_ratio >= 1.0:
            raise ValueError("focal_ratio = 1 keeps every token focal: there are no chunks")
        return ceil_exact(self.focal_ratio * self.group_size / (1.0 - self.focal_ratio))

    @property
    def chunk_size(self) -> int:
        """m' = m + r': tail length at which streaming selection flushes."""
        return self.group_size + self.chunk_focal

    def sizes(self, seq_len: int) -> LayoutSizes:
        """The static entry counts of a layout over `seq_len` positions."""
        num_focal, num_groups = (int(x) for x in self.counts(np.asarray(seq_len)))
        chunk = self.chunk_size if self.selection == "streaming" and self.focal_ratio < 1 else 0
        return LayoutSizes(seq_len, self.group_size, num_focal, num_groups, chunk)

    def counts(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(focal tokens, groups) of sequences of `lengths` positions, elementwise (any shape).

        Global: r = ceil(gamma n) focal, (n - r) // m groups; streaming: r' focal and one group
        per complete chunk of m'; gamma = 1: every token focal. float64 on the host, so that
        `ceil_exact` is the same everywhere (a device's float32 would round gamma * n).
        """
        n = np.asarray(lengths, np.int64)
        if self.focal_ratio >= 1.0:
            return n, np.zeros_like(n)
        if self.selection == "global":
            r = np.minimum(n, np.ceil(self.focal_ratio * n - 1e-6).astype(np.int64))
            return r, (n - r) // self.group_size
        chunks = n // self.chunk_size
        return chunks * self.chunk_focal, chunks


def _concrete(name: str, x):
    """A concrete 0-d array as its NumPy scalar (a float32 then counts as its decimal, below); a
    traced one is an error: the hyper-parameters fix static shapes."""
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"dga.{name} must be a concrete number, got a tracer: it fixes static shapes, so pass "
            "it as a static argument (jax.jit(..., static_argnames=...)) or close over it"
        )
    if isinstance(x, jax.Array | np.ndarray) and x.shape == ():
        return np.asarray(x)[()]
    return x


@dataclasses.dataclass(frozen=True)
class LayoutSizes:
    """Entry counts of one (batch, KV head) layout; `chunk` is m' for streaming, else 0."""

    seq_len: int
    group_size: int
    num_focal: int
    num_groups: int
    chunk: int

    @property
    def num_raw(self) -> int:
        """Non-focal tokens: group members first (in groups of m), then the leftovers."""
        return self.seq_len - self.num_focal

    @property
    def num_prefix(self) -> int:
        """Focal tokens and group entries: the list every query sees a prefix of."""
        return self.num_focal + self.num_groups
