"""RoPE frequency scaling, a field of `ModelConfig`: its kinds, their settings and checks.

The frequencies themselves are `dga_jax.model.layers.rope_frequencies`; `hf_config.py` maps
transformers' `rope_scaling` / `rope_parameters` section onto this.
"""

from __future__ import annotations

import dataclasses
import math

ROPE_KINDS = ("none", "linear", "llama3", "yarn")
_ORIGINAL_KINDS = ("llama3", "yarn")  # the kinds that read original_max_position


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: none, linear (positions / factor), llama3 (per band) or yarn
    (per band, and cos and sin scaled by an attention factor: `attention_scaling`)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3, yarn: the context the model was trained at
    # yarn: the band of dims ramped from interpolated to extrapolated, in rotations over
    # original_max_position (the fast end keeps its frequencies, the slow end divides by factor)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: on cos and sin; None: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: the band's ends rounded out to whole dims

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope_scaling.kind must be one of {ROPE_KINDS}, got {self.kind!r}")
        if not self.factor > 0:  # NaN too: NaN logits otherwise
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind in _ORIGINAL_KINDS:
            self._check_original_max_position()
        if self.kind == "llama3":
            self._check_llama3_bands()
        if self.kind == "yarn":
            self._check_yarn()

    @property
    def attention_scaling(self) -> float:
        """The factor on RoPE's cos and sin (transformers' `attention_scaling`): 1 but for
        yarn, whose default is YaRN's 0.1 ln(factor) + 1."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return yarn_mscale(self.factor)

    def _check_original_max_position(self) -> None:
        if isinstance(self.original_max_position, bool) or not (
            isinstance(self.original_max_position, int) and self.original_max_position >= 1
        ):
            raise ValueError(
                "rope_scaling.original_max_position must be a positive int, "
                f"got {self.original_max_position!r}"
            )

    def _check_llama3_bands(self) -> None:
        """llama3's bands divide by low_freq_factor and high - low (transformers requires
        high > low too)."""
        if not self.low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling.low_freq_factor must be > 0, got {self.low_freq_factor}"
            )
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must be greater than "
                f"rope_scaling.low_freq_factor={self.low_freq_factor}"
            )

    def _check_yarn(self) -> None:
        """The band's ends take the log of original_max_position / beta (a beta <= 0: NaN
        frequencies); a fast end below the slow one inverts the ramp (transformers warns)."""
        for name in ("beta_fast", "beta_slow"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rope_scaling.{name} must be > 0, got {getattr(self, name)}")
        if self.beta_fast < self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast={self.beta_fast} must be >= "
                f"rope_scaling.beta_slow={self.beta_slow}"
            )
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(
                "rope_scaling.attention_factor must be > 0 or None (YaRN's default), "
                f"got {self.attention_factor}"
            )
        if not isinstance(self.truncate, bool):  # a "false" would truncate
            raise ValueError(f"rope_scaling.truncate must be a bool, got {self.truncate!r}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), as
    transformers' `yarn_get_mscale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
