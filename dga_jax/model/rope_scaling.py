"""RoPE frequency scaling, a field of `ModelConfig`: its kinds, their settings and checks.

The frequencies themselves are `dga_jax.model.layers.rope_frequencies`; `hf_config.py` maps
transformers' `rope_scaling` / `rope_parameters` section onto this.
"""

from __future__ import annotations

import dataclasses
import math

ROPE_KINDS = ("none", "linear", "llama3", "yarn", "dynamic", "longrope")
# the kinds that read original_max_position
_ORIGINAL_KINDS = ("llama3", "yarn", "dynamic", "longrope")
# the kinds whose frequencies depend on the length of the sequence they rotate (`length_dependent`)
LENGTH_KINDS = ("dynamic", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: none, linear (positions / factor), llama3 (per band), yarn
    (per band, and cos and sin scaled by an attention factor: `attention_scaling`), or one of
    the two whose frequencies follow the length L of the sequence being rotated (each row's:
    its last position + 1; `length_dependent`), as transformers' `dynamic_rope_update`:

    - dynamic (dynamic NTK): past original_max_position, theta grows to
      theta * (factor * L / original_max_position - factor + 1) ** (D / (D - 2));
    - longrope (LongRoPE, Phi-3): each frequency divided by short_factor[i] while L is at most
      original_max_position, by long_factor[i] past it (D / 2 factors each), and cos and sin
      scaled by attention_factor (default sqrt(1 + ln(factor) / ln(original_max_position)),
      factor being the context's growth, max_position / original_max_position).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    # llama3, yarn, longrope: the context the model was trained at; dynamic: the one it scales
    # past (transformers' max_position_embeddings)
    original_max_position: int = 8192
    # yarn: the band of dims ramped from interpolated to extrapolated, in rotations over
    # original_max_position (the fast end keeps its frequencies, the slow end divides by factor)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # yarn, longrope: on cos and sin; None: their defaults from factor (`attention_scaling`)
    attention_factor: float | None = None
    truncate: bool = True  # yarn: the band's ends rounded out to whole dims
    # longrope: one divisor per frequency (rotated channels / 2), up to the original and past it
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope_scaling.kind must be one of {ROPE_KINDS}, got {self.kind!r}")
        for name in ("short_factor", "long_factor"):  # lists (from JSON) as hashable tuples
            object.__setattr__(self, name, _factors(name, getattr(self, name)))
        if not self.factor > 0:  # NaN too: NaN logits otherwise
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind in _ORIGINAL_KINDS:
            self._check_original_max_position()
        if self.kind == "llama3":
            self._check_llama3_bands()
        if self.kind == "yarn":
            self._check_yarn()
        if self.kind == "longrope":
            self._check_longrope()
        elif self.short_factor or self.long_factor:
            raise ValueError(
                f"rope_scaling.short_factor and long_factor are longrope's; kind is {self.kind!r}"
            )

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the length of the sequence rotated
        (`dga_jax.model.layers.rope_frequencies` then takes it)."""
        return self.kind in LENGTH_KINDS

    @property
    def attention_scaling(self) -> float:
        """The factor on RoPE's cos and sin (transformers' `attention_scaling`): 1 but for
        yarn, whose default is YaRN's 0.1 ln(factor) + 1, and longrope, whose default is
        sqrt(1 + ln(factor) / ln(original_max_position)) (1 for factor <= 1)."""
        if self.kind not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.kind == "yarn":
            return yarn_mscale(self.factor)
        if self.factor <= 1:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))

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
        self._check_attention_factor("YaRN")
        if not isinstance(self.truncate, bool):  # a "false" would truncate
            raise ValueError(f"rope_scaling.truncate must be a bool, got {self.truncate!r}")

    def _check_longrope(self) -> None:
        """Both factor lists, of one length (the model checks it against its rotated channels /
        2: `check_rope_dims`); an attention factor > 0 where given."""
        if not self.short_factor or len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                "rope_scaling kind 'longrope' needs short_factor and long_factor of one length "
                f"(one per frequency), got {len(self.short_factor)} and {len(self.long_factor)}"
            )
        self._check_attention_factor("LongRoPE")
        if self.attention_factor is None and self.factor > 1 and self.original_max_position < 2:
            raise ValueError(  # the default divides by ln(original_max_position)
                "rope_scaling kind 'longrope' without an attention_factor needs "
                f"original_max_position >= 2, got {self.original_max_position}"
            )

    def _check_attention_factor(self, method: str) -> None:
        """yarn's and longrope's factor on cos and sin: > 0, or None (the method's default)."""
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(
                f"rope_scaling.attention_factor must be > 0 or None ({method}'s default), "
                f"got {self.attention_factor}"
            )


def check_rope_dims(head_dim: int, rotary_dim: int | None, scaling: RopeScaling) -> None:
    """A ModelConfig's RoPE channels: rotary_dim (None: head_dim) even, in 2 .. head_dim (RoPE
    rotates channels in halves), more than 2 for dynamic NTK (its base grows by a power
    D / (D - 2)); longrope's factors, one per frequency, the rotated channels / 2 each."""
    if rotary_dim is not None and (
        isinstance(rotary_dim, bool)
        or not isinstance(rotary_dim, int)
        or rotary_dim % 2
        or not 2 <= rotary_dim <= head_dim
    ):
        raise ValueError(
            f"model.rotary_dim must be an even int in 2 .. head_dim={head_dim}, or None (all "
            f"channels), got {rotary_dim!r}"
        )
    rotated = head_dim if rotary_dim is None else rotary_dim
    if scaling.kind == "dynamic" and rotated <= 2:
        raise ValueError(
            f"rope_scaling kind 'dynamic' rotates {rotated} channels of each head: dynamic NTK "
            "needs more than 2 (its base grows by a power D / (D - 2))"
        )
    if scaling.kind == "longrope" and len(scaling.short_factor) != rotated // 2:
        raise ValueError(
            f"model.rope_scaling.short_factor and long_factor hold {len(scaling.short_factor)} "
            f"factors each; longrope needs one per frequency: {rotated // 2} for the {rotated} "
            "channels of each head RoPE rotates"
        )


def _factors(name: str, values) -> tuple[float, ...]:
    """A longrope factor list as a tuple of floats, each > 0 (a frequency is divided by it)."""
    try:
        factors = tuple(float(x) for x in values)
    except (TypeError, ValueError):
        raise ValueError(f"rope_scaling.{name} must be a list of numbers, got {values!r}") from None
    bad = [x for x in factors if not x > 0]
    if bad or any(isinstance(x, bool) for x in values):
        raise ValueError(f"rope_scaling.{name} must hold numbers > 0, got {bad or values}")
    return factors


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), as
    transformers' `yarn_get_mscale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
