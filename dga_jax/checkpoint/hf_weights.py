"""The table of a Hugging Face checkpoint's tensors and our parameters: each HF name (per layer
where it holds `{i}`), the parameter path it maps to, and how its layout differs (`Weight`);
`weights(config)` lists those a config has (attention biases, an untied head, Phi-3's fused
tensors), `hf_tensors(config)` the HF tensors that hold them: one weight each, or several
stacked by rows in a fused one (Phi-3's qkv_proj and gate_up_proj).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from flax import nnx, traverse_util

from dga_jax.model.config import ModelConfig
from dga_jax.model.llama import Llama

Path = tuple[str, ...]
ParamReader = Callable[[Path], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Weight:
    """One HF tensor (one per layer where `hf` holds `{i}`) and the parameter it maps to.

    A Linear weight (`in_dims` > 0) is [out, in] in HF and [*in, *out] here, its first `in_dims`
    axes being the input ones: q [d, H, hd] <- q_proj [H*hd, d] (in_dims=1) and
    o [H, hd, d] <- o_proj [d, H*hd] (in_dims=2). A `flat` one (a bias) is one axis in HF:
    q_bias [H, hd] <- q_proj.bias [H*hd]. Other weights are stored as they are.
    """

    hf: str
    path: Path
    in_dims: int = 0
    flat: bool = False

    @property
    def stacked(self) -> bool:
        """Whether this is a per-layer weight, stacked on a leading `num_layers` axis here."""
        return "{i}" in self.hf

    def names(self, num_layers: int) -> list[str]:
        """The HF names, layer by layer for a stacked weight."""
        if not self.stacked:
            return [self.hf]
        return [self.hf.format(i=i) for i in range(num_layers)]

    def layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one layer's slice of our parameter of this `shape`."""
        return tuple(shape[1:]) if self.stacked else tuple(shape)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF's shape for one of our (per-layer) shapes."""
        if self.flat:
            return (math.prod(shape),)
        if not self.in_dims:
            return tuple(shape)
        return (math.prod(shape[self.in_dims :]), math.prod(shape[: self.in_dims]))

    def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor [out, in] -> ours [*in, *out] (a view where no transpose is needed)."""
        return tensor.T.reshape(shape) if self.in_dims else tensor.reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Ours [*in, *out] -> HF [out, in] (flat: one axis)."""
        if self.flat:
            return array.reshape(-1)
        if not self.in_dims:
            return array
        return array.reshape(math.prod(array.shape[: self.in_dims]), -1).T


_LAYER = "model.layers.{i}."
EMBED = Weight("model.embed_tokens.weight", ("embed",))
_WEIGHTS = (
    EMBED,
    Weight(_LAYER + "input_layernorm.weight", ("layers", "attn_norm", "weight")),
    Weight(_LAYER + "self_attn.q_proj.weight", ("layers", "attn", "q"), 1),
    Weight(_LAYER + "self_attn.k_proj.weight", ("layers", "attn", "k"), 1),
    Weight(_LAYER + "self_attn.v_proj.weight", ("layers", "attn", "v"), 1),
    Weight(_LAYER + "self_attn.o_proj.weight", ("layers", "attn", "o"), 2),
    Weight(_LAYER + "post_attention_layernorm.weight", ("layers", "mlp_norm", "weight")),
    Weight(_LAYER + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), 1),
    Weight(_LAYER + "mlp.up_proj.weight", ("layers", "mlp", "up"), 1),
    Weight(_LAYER + "mlp.down_proj.weight", ("layers", "mlp", "down"), 1),
    Weight("model.norm.weight", ("norm", "weight")),
)
# Phi-3 fuses q, k and v into one tensor's rows, and gate and up into another's, in the order of
# `_WEIGHTS` (`hf_tensors` keeps it): qkv_proj [H*hd + 2*Hkv*hd, d], gate_up_proj [2*F, d].
_PHI3_FUSED = {
    ("layers", "attn", "q"): _LAYER + "self_attn.qkv_proj.weight",
    ("layers", "attn", "k"): _LAYER + "self_attn.qkv_proj.weight",
    ("layers", "attn", "v"): _LAYER + "self_attn.qkv_proj.weight",
    ("layers", "mlp", "gate"): _LAYER + "mlp.gate_up_proj.weight",
    ("layers", "mlp", "up"): _LAYER + "mlp.gate_up_proj.weight",
}
_PHI3_WEIGHTS = tuple(
    dataclasses.replace(weight, hf=_PHI3_FUSED.get(weight.path, weight.hf)) for weight in _WEIGHTS
)
_QKV_BIASES = tuple(
    Weight(_LAYER + f"self_attn.{name}_proj.bias", ("layers", "attn", f"{name}_bias"), flat=True)
    for name in "qkv"
)
_O_BIAS = Weight(_LAYER + "self_attn.o_proj.bias", ("layers", "attn", "o_bias"))
_QK_NORMS = tuple(
    Weight(_LAYER + f"self_attn.{name}_norm.weight", ("layers", "attn", f"{name}_norm", "weight"))
    for name in "qk"
)
LM_HEAD = Weight("lm_head.weight", ("lm_head",), 1)


def weights(config: ModelConfig) -> tuple[Weight, ...]:
    """Every weight of a model with this config, under the HF names of its `hf_model_type`
    (Phi-3's fused ones): the attention biases it has (`qkv_bias`, `o_bias`), Qwen3's q and k
    norms (`qk_norm`), `lm_head` only when it is not tied."""
    layout = _PHI3_WEIGHTS if config.hf_model_type == "phi3" else _WEIGHTS
    biases = (_QKV_BIASES if config.qkv_bias else ()) + ((_O_BIAS,) if config.o_bias else ())
    norms = _QK_NORMS if config.qk_norm else ()
    return layout + biases + norms + (() if config.tie_embeddings else (LM_HEAD,))


def hf_tensors(config: ModelConfig) -> dict[str, tuple[Weight, ...]]:
    """Each HF tensor of a model with this config (its name, per layer where it holds `{i}`) ->
    the weights it holds, in the order of its rows: one, or those a fused tensor stacks."""
    tensors: dict[str, tuple[Weight, ...]] = {}
    for weight in weights(config):
        tensors[weight.hf] = (*tensors.get(weight.hf, ()), weight)
    return tensors


def hf_tensor_shape(
    parts: tuple[Weight, ...], shapes: dict[Path, tuple[int, ...]]
) -> tuple[int, ...]:
    """The shape of one (per-layer) HF tensor holding `parts`, from our `param_shapes`: the
    parts' rows stacked, e.g. qkv_proj [H*hd + 2*Hkv*hd, d]."""
    each = [_part_shape(weight, shapes) for weight in parts]
    return (sum(shape[0] for shape in each), *each[0][1:])


def split_rows(
    tensor: np.ndarray, parts: tuple[Weight, ...], shapes: dict[Path, tuple[int, ...]]
) -> list[np.ndarray]:
    """One (per-layer) HF tensor as the HF tensors of its `parts` (views of its rows)."""
    ends = np.cumsum([_part_shape(weight, shapes)[0] for weight in parts])
    return np.split(tensor, ends[:-1])


def _part_shape(weight: Weight, shapes: dict[Path, tuple[int, ...]]) -> tuple[int, ...]:
    """HF's per-layer shape of one weight alone (its rows of a fused tensor)."""
    return weight.hf_shape(weight.layer_shape(shapes[weight.path]))


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of each parameter of `Llama(config)` ([N, ...] for per-layer ones)."""

    def build() -> Llama:
        return Llama(config, rngs=nnx.Rngs(0))

    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}
