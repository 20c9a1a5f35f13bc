"""Writing a Hugging Face safetensors checkpoint (LLaMA, Mistral, Qwen2, Qwen3 or Phi-3, as
`config_to_hf` says) from our parameter tree.

The shards are planned from the shapes alone (`dga_jax.checkpoint.hf_weights.hf_tensors`), then
each stacked parameter is read once and its per-layer slices are emitted into them; a shard is
written as soon as it is complete, so at most one HF tensor's parameters (one, or Phi-3's q, k,
v and gate, up fused) and one shard are in memory. The
files go to a temporary sibling directory renamed into place at the end: `.<name>.tmp-<host>-
<pid>-<random>`, removed on an error, and by the next export to `<name>` if a kill left it: its
process, on this host, has ended, and nothing holds the lock on `<it>.lock` that an export holds
while it writes (a pid seen from another PID namespace, a container's, can look ended).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import numpy as np
from safetensors.numpy import save_file

from dga_jax.checkpoint.hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    NUMPY_DTYPES,
    check_cast,
    check_dtype,
)
from dga_jax.checkpoint.hf_weights import (
    ParamReader,
    Weight,
    hf_tensor_shape,
    hf_tensors,
    param_shapes,
)
from dga_jax.errors import InputError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import config_to_hf, hf_token_ids

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes in "5GB" (10^9), "2GiB" (2^30), "40KB" or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not match:
        raise InputError(f"invalid size {size!r}; expected e.g. 5GB, 500MB, 2GiB or bytes")
    return int(float(match[1]) * SIZE_UNITS[match[2] or ""])


def write_hf(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    read_param: ParamReader,
    *,
    dtype: str,
    max_shard_size: int,
) -> None:
    """Writes a HF checkpoint: config.json, model-0000i-of-0000n.safetensors, the index and,
    when the config has special token ids, generation_config.json with them (the fields of it
    that transformers derives from a LLaMA config).

    `read_param(path)` returns one stacked parameter at a time (numpy, [N, ...] per layer);
    each is sliced, cast to `dtype` (the rows of a fused tensor's parameters stacked) and written
    into shards of at most `max_shard_size` bytes (a single larger tensor gets a shard of its
    own). The files are written into a temporary
    sibling directory, flushed to disk and renamed to `out_dir` at the end, so a failure or a
    crash leaves no `out_dir`, and no `out_dir` with files still unwritten.
    """
    config = config.replace(param_dtype=check_dtype(dtype))
    hf_config = config_to_hf(config)  # a config no HF architecture holds fails before writing
    sizes = _hf_sizes(config, np.dtype(NUMPY_DTYPES[dtype]).itemsize)
    shards = _plan_shards(sizes, max_shard_size)
    with _atomic_directory(out_dir) as tmp:
        writer = _ShardWriter(tmp, shards)
        for parts in hf_tensors(config).values():
            arrays = [read_param(weight.path) for weight in parts]
            layers = zip(*(array if parts[0].stacked else [array] for array in arrays), strict=True)
            for name, layer in zip(parts[0].names(config.num_layers), layers, strict=True):
                writer.add(name, _hf_tensor(name, parts, layer, NUMPY_DTYPES[dtype]))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": writer.files}
        _write_json(os.path.join(tmp, INDEX_FILE), index)
        _write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
        token_ids = hf_token_ids(config)
        if token_ids:
            _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE), token_ids)


def _hf_tensor(
    name: str, parts: tuple[Weight, ...], arrays: tuple[np.ndarray, ...], dtype: np.dtype
) -> np.ndarray:
    """The HF tensor `name` of one layer's `arrays` of its `parts`, cast to `dtype`: one
    parameter's, or the rows of several stacked (Phi-3's fused qkv_proj, gate_up_proj)."""
    rows = []
    for weight, array in zip(parts, arrays, strict=True):
        rows.append(np.ascontiguousarray(weight.to_hf(array), dtype))
        check_cast(rows[-1], array, f"parameter {'.'.join(weight.path)!r} ({name})")
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def _hf_sizes(config: ModelConfig, itemsize: int) -> dict[str, int]:
    """HF name -> bytes, in the order `write_hf` emits the tensors."""
    shapes = param_shapes(config)
    sizes = {}
    for parts in hf_tensors(config).values():
        size = math.prod(hf_tensor_shape(parts, shapes)) * itemsize
        sizes.update(dict.fromkeys(parts[0].names(config.num_layers), size))
    return sizes


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive names grouped greedily into shards of at most `max_bytes`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


class _ShardWriter:
    """Collects tensors, arriving in plan order, and writes each shard once it is complete."""

    def __init__(self, out_dir: str, shards: list[list[str]]):
        self.out_dir = out_dir
        self.pending: dict[str, np.ndarray] = {}
        self.files = {}
        self.last = {}
        for k, names in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            self.files.update(dict.fromkeys(names, file))
            self.last[names[-1]] = file

    def add(self, name: str, tensor: np.ndarray) -> None:
        self.pending[name] = tensor
        if name in self.last:
            path = os.path.join(self.out_dir, self.last[name])
            save_file(self.pending, path, metadata={"format": "pt"})
            _sync(path)
            self.pending = {}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    _sync(path)


def _sync(path: str) -> None:
    """Flushes a file's data to the disk. Without it a crash soon after the rename can leave
    an output that looks complete but holds empty or cut files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: str) -> None:
    """Flushes a directory's entries to the disk where its file system can (not all can)."""
    with contextlib.suppress(OSError):
        _sync(path)


@contextlib.contextmanager
def _atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """A temporary sibling of `path`, flushed and renamed to `path` if the block succeeds, else
    removed."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"output directory already exists: {path}")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.tmp-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would otherwise become the output's mode
    with _held(tmp + LOCK_SUFFIX):
        try:
            yield tmp
            _sync_directory(tmp)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _sync_directory(parent)  # the rename itself


LOCK_SUFFIX = ".lock"  # beside a temporary directory: held while its export writes


@contextlib.contextmanager
def _held(lock_path: str) -> Iterator[None]:
    """An exclusive `flock` on `lock_path` for the block; the file is removed after it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # the lock goes with it


def _remove_stale(parent: str, prefix: str) -> None:
    """Removes the directories `prefix`<host>-<pid>-<random> in `parent` whose process, on this
    host, has ended: what exports killed midway left. Another host's are left (its processes
    cannot be seen from here), as is a live export's."""
    for entry in os.listdir(parent):
        stale = os.path.join(parent, entry)
        if not entry.startswith(prefix) or entry.endswith(LOCK_SUFFIX):
            continue
        if _owner_ended(entry[len(prefix) :]) and _lock_free(stale + LOCK_SUFFIX):
            logging.warning("removing %s, left by an export that was killed", entry)
            shutil.rmtree(stale, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(stale + LOCK_SUFFIX)


def _lock_free(lock_path: str) -> bool:
    """Whether no process holds `lock_path`'s flock (or there is no such file)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _owner_ended(tag: str) -> bool:
    """Whether the process that `tag` (<host>-<pid>-<random>) names is known to have ended."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)  # signal 0 is not sent: it asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process, alive
        return False
    return False
