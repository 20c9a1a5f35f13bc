"""Hugging Face safetensors checkpoints (LLaMA, Mistral, Qwen2, Qwen3, Phi-3) <-> our
parameters, one tensor at a time.

Our parameters are a nested dict of numpy arrays keyed like `nnx.state(model, nnx.Param)`, the
per-layer ones stacked on a leading `num_layers` axis. `dga_jax.checkpoint.hf_weights` holds
the name and layout table (`weights`, `hf_tensors`); this file reads, preallocating each
stacked array once and filling it layer by layer from `safe_open` (a fused tensor's rows into
each of its parameters); `dga_jax.checkpoint.hf_write` writes. Neither direction holds two
copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from dga_jax.checkpoint.hf_weights import (
    EMBED,
    LM_HEAD,
    Path,
    Weight,
    hf_tensor_shape,
    hf_tensors,
    param_shapes,
    split_rows,
)
from dga_jax.errors import InputError, MissingInputError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import with_generation_token_ids

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# jnp.bfloat16 is ml_dtypes' numpy bfloat16, which `safe_open(framework="numpy")` needs registered.
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# What a tensor may be stored as: any float, cast on reading (integers would become weights).
READABLE_DTYPES = (*SAFETENSORS_DTYPES, "F64")
# Buffers that older exports saved; RoPE is recomputed from the config.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CheckpointError(InputError):
    """Checkpoint contents that do not fit the model: missing, unexpected or misshapen tensors."""


# Reading ------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """Our config from `hf_dir/config.json`, with the special token ids of
    `hf_dir/generation_config.json` if there is one (`with_generation_token_ids`); an unsupported
    architecture, or a missing or bad value, raises an `InputError` naming the file and the key."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise MissingInputError(f"no {CONFIG_FILE} in the HF checkpoint directory: {path}")
    hf = _read_json(path)
    try:
        config = ModelConfig.from_hf(hf)
    except ValueError as error:  # a ConfigError of the mapping, or a rule of ModelConfig
        raise InputError(f"{path}: {error}") from error
    path = os.path.join(hf_dir, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return config
    generation = _read_json(path)
    try:
        return with_generation_token_ids(config, generation)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from error


def tensor_files(hf_dir: str | os.PathLike) -> tuple[dict[str, str], str]:
    """HF tensor name -> the safetensors file holding it, and the file that listed them."""
    index = os.path.join(hf_dir, INDEX_FILE)
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index):
        weight_map = _weight_map(index)
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}, index
    if os.path.isfile(single):
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single), single
    raise MissingInputError(f"no safetensors checkpoint in {hf_dir}: neither {index} nor {single}")


def _weight_map(index: str) -> dict[str, str]:
    """The tensor name -> file name map of a `model.safetensors.index.json`."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise InputError(f"{index} has no 'weight_map' of tensor name -> file name")
    return weight_map


def read_hf(
    hf_dir: str | os.PathLike, dtype: str | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a HF LLaMA checkpoint into our config and nested parameter dict (numpy arrays).

    Every tensor's presence, shape and float dtype are checked (from the file headers) before
    any data is read. `dtype` (float32, bfloat16, float16) casts each tensor as it is read; by
    default the embedding's stored dtype is kept. The config's `param_dtype` is set to the
    result's dtype.
    """
    config = read_hf_config(hf_dir)
    files, listing = tensor_files(hf_dir)
    plan = _read_plan(config, files, listing)
    by_file = _group_by_file(plan, files)
    shapes = param_shapes(config)
    for file, names in by_file.items():
        _check_tensors(file, names, plan, shapes)
    _check_tied_head(config, files)
    dtype = check_dtype(dtype) if dtype else _stored_dtype(files[EMBED.hf])
    params = {path: np.empty(shape, NUMPY_DTYPES[dtype]) for path, shape in shapes.items()}
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                parts, layer = plan[name]
                tensor = f.get_tensor(name)
                for weight, rows in zip(parts, split_rows(tensor, parts, shapes), strict=True):
                    target = params[weight.path] if layer is None else params[weight.path][layer]
                    target[...] = weight.to_ours(rows, target.shape)
                    check_cast(target, rows, f"tensor {name!r} in {file}")
    return config.replace(param_dtype=dtype), traverse_util.unflatten_dict(params)


def check_cast(cast: np.ndarray, source: np.ndarray, what: str) -> None:
    """A cast of `source` that turned finite values into infinities (float16's largest is 65504)
    is a `CheckpointError` naming `what`: the model would compute NaNs from it."""
    if cast.dtype == source.dtype or np.isfinite(cast).all():
        return
    if np.count_nonzero(~np.isfinite(cast)) > np.count_nonzero(~np.isfinite(source)):
        largest = np.max(np.abs(source), where=np.isfinite(source), initial=0)
        raise CheckpointError(
            f"{what} holds {float(largest):g}, beyond the range of {cast.dtype}: the cast "
            "would make it infinite; convert to float32 or bfloat16 instead"
        )


def check_dtype(dtype: str) -> str:
    """`dtype` if it names a supported parameter dtype, else a ValueError."""
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {sorted(NUMPY_DTYPES)}")
    return dtype


def _read_plan(
    config: ModelConfig, files: dict[str, str], listing: str
) -> dict[str, tuple[tuple[Weight, ...], int | None]]:
    """HF name -> (the weights it holds, layer or None), once every name is known to be listed
    and no unknown tensor is."""
    plan = {}
    for parts in hf_tensors(config).values():
        for i, name in enumerate(parts[0].names(config.num_layers)):
            plan[name] = (parts, i if parts[0].stacked else None)
    missing = [name for name in plan if name not in files]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from {listing}"
            f" ({len(missing)} missing: {missing[:8]})"
        )
    tied_head = {LM_HEAD.hf} if config.tie_embeddings else set()
    unexpected = sorted(
        n for n in files if n not in plan and n not in tied_head and not IGNORED.fullmatch(n)
    )
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor(s) {unexpected[:8]} in {listing}: not part of "
            f"the model of config.json, {config.num_layers} layers"
        )
    return plan


def _group_by_file(plan: dict[str, Any], files: dict[str, str]) -> dict[str, list[str]]:
    """File -> the planned names it holds; every file must exist."""
    grouped: dict[str, list[str]] = {}
    for name in plan:
        grouped.setdefault(files[name], []).append(name)
    for file, names in grouped.items():
        if not os.path.isfile(file):
            raise MissingInputError(
                f"safetensors file {file} (listed for {names[0]!r}) does not exist"
            )
    return grouped


def _check_tensors(
    file: str,
    names: list[str],
    plan: dict[str, tuple[tuple[Weight, ...], int | None]],
    shapes: dict[Path, tuple[int, ...]],
) -> None:
    """Each of `names` is in `file`, stored as a float, in the shape the `plan`'s weights of it
    have in our `param_shapes`."""
    with _open(file) as f:
        stored = set(f.keys())
        for name in names:
            if name not in stored:
                raise CheckpointError(f"tensor {name!r} is missing from {file}")
            tensor = f.get_slice(name)
            if tensor.get_dtype() not in READABLE_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {file} is stored as {tensor.get_dtype()}; "
                    f"expected a float weight, one of {READABLE_DTYPES}"
                )
            found, parts = tuple(tensor.get_shape()), plan[name][0]
            expected = hf_tensor_shape(parts, shapes)
            if found != expected:
                raise CheckpointError(
                    f"tensor {name!r} in {file} has shape {found}; "
                    f"expected {expected} from the config{_rows_note(parts, shapes)}"
                )


def _rows_note(parts: tuple[Weight, ...], shapes: dict[Path, tuple[int, ...]]) -> str:
    """For a fused tensor, which parameters its rows hold and how many each, e.g.
    " (the rows of q, k, v: 64 + 32 + 32)"; "" for a tensor of one parameter."""
    if len(parts) == 1:
        return ""
    rows = [hf_tensor_shape((weight,), shapes)[0] for weight in parts]
    names = ", ".join(weight.path[-1] for weight in parts)
    return f" (the rows of {names}: {' + '.join(map(str, rows))})"


def _check_tied_head(config: ModelConfig, files: dict[str, str]) -> None:
    """A tied model's checkpoint may also hold an lm_head.weight: the embedding again is the tie;
    another tensor is a `CheckpointError`, as transformers >= 5 would use it (untied) where 4.x
    used the embedding, two different models."""
    if not config.tie_embeddings or LM_HEAD.hf not in files:
        return
    embed, head = (_read_tensor(files[weight.hf], weight.hf) for weight in (EMBED, LM_HEAD))
    if embed.shape != head.shape or not np.array_equal(embed, head):
        raise CheckpointError(
            f"{CONFIG_FILE} ties lm_head to the embedding (tie_word_embeddings=true), but "
            f"{files[LM_HEAD.hf]} holds an {LM_HEAD.hf} that differs from {EMBED.hf}; "
            "set tie_word_embeddings to false to use it, or remove it to tie"
        )


def _read_tensor(file: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file; a name the file lacks is a `CheckpointError`."""
    with _open(file) as f:
        if name not in set(f.keys()):
            raise CheckpointError(f"tensor {name!r} is missing from {file}")
        return f.get_tensor(name)


def _stored_dtype(file: str) -> str:
    """Our name of the dtype the embedding is stored in."""
    with _open(file) as f:
        stored = f.get_slice(EMBED.hf).get_dtype()
    if stored not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{EMBED.hf} in {file} is {stored}; pass a dtype "
            f"(one of {sorted(NUMPY_DTYPES)}) to convert it"
        )
    return SAFETENSORS_DTYPES[stored]


def _open(file: str) -> Any:
    """`safe_open(file)`, a damaged file (truncated, empty, not safetensors) a `CheckpointError`
    naming it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error


def _read_json(path: str) -> Any:
    """The JSON value in `path`; invalid JSON is an `InputError` naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as error:  # JSONDecodeError, or bytes that are not text
            raise InputError(f"{path} is not valid JSON: {error}") from error
