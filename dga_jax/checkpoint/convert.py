"""Convert LLaMA (and Mistral, Qwen2, Qwen3, Phi-3) checkpoints between Hugging Face safetensors
and our Orbax layout.

    python -m dga_jax.checkpoint.convert hf-to-orbax --hf_dir HF --out CKPT [--dtype bfloat16]
    python -m dga_jax.checkpoint.convert orbax-to-hf --ckpt CKPT --out HF [--dtype float16] \\
        [--max_shard_size 5GB]

`hf-to-orbax` reads `HF/config.json` (and the token ids of `HF/generation_config.json`) and
`HF/model.safetensors.index.json` (or a single `HF/model.safetensors`) tensor by tensor;
`orbax-to-hf` writes what `transformers.AutoModelForCausalLM.from_pretrained(HF)` loads (a
`LlamaForCausalLM`, a `MistralForCausalLM` for a sliding window, a `Qwen2ForCausalLM` for q, k,
v biases alone, a `Qwen3ForCausalLM` for q and k norms, a `Phi3ForCausalLM` for a model read
from one), the
source's bos/eos/pad token ids included (in config.json and generation_config.json). `--dtype`
casts the weights (default: keep the stored dtype). Neither command leaves a partial output
behind on failure. Load the result with `dga_jax.checkpoint.load_model(CKPT, mesh=...)`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from dga_jax.checkpoint.hf import NUMPY_DTYPES, read_hf
from dga_jax.checkpoint.hf_weights import param_shapes
from dga_jax.checkpoint.hf_write import parse_size, write_hf
from dga_jax.checkpoint.orbax_io import check_stored, load_config, read_param, save_params
from dga_jax.errors import InputError

DEFAULT_MAX_SHARD_SIZE = "5GB"


def hf_to_orbax(
    hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None
) -> None:
    """Converts a HF LLaMA checkpoint directory into an Orbax checkpoint directory `out` (which
    must not exist: checked before the weights are read)."""
    check_out(out)
    config, params = read_hf(hf_dir, dtype)
    save_params(out, config, params)


def orbax_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Converts an Orbax checkpoint into a HF LLaMA checkpoint directory `out`; stored
    parameters that do not fit its stored config are a `CheckpointError` before any is written."""
    max_bytes = parse_size(max_shard_size)
    config = load_config(ckpt)
    check_stored(ckpt, param_shapes(config), "its model config")
    check_out(out)
    write_hf(
        out,
        config,
        functools.partial(read_param, ckpt),
        dtype=dtype or config.param_dtype,
        max_shard_size=max_bytes,
    )


def check_out(out: str | os.PathLike) -> None:
    """`out` can be made: it does not exist, and its nearest existing ancestor is a directory
    this process may write in (else the conversion would fail after reading every weight)."""
    path = os.path.abspath(out)
    if os.path.lexists(path):
        raise FileExistsError(f"output directory already exists: {path}")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"output directory {path} cannot be made: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory {path} cannot be made: {parent} is not writable")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: `hf-to-orbax` or `orbax-to-hf` (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "hf-to-orbax":
        hf_to_orbax(args.hf_dir, args.out, args.dtype)
    else:
        orbax_to_hf(args.ckpt, args.out, args.dtype, args.max_shard_size)


def _run_command() -> None:
    """`main` as `python -m` runs it: a problem with the input or output directory (a full
    disk included) ends it with one `error:` line and exit code 2 (a traceback means a bug)."""
    try:
        main()
    except (InputError, OSError) as error:
        print(f"python -m dga_jax.checkpoint.convert: error: {error}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dga_jax.checkpoint.convert", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_orbax = commands.add_parser("hf-to-orbax", help="HF safetensors -> Orbax")
    to_orbax.add_argument("--hf_dir", required=True, help="HF checkpoint directory")
    to_hf = commands.add_parser("orbax-to-hf", help="Orbax -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="Orbax checkpoint directory")
    to_hf.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB",
    )
    for command in (to_orbax, to_hf):
        command.add_argument("--out", required=True, help="output directory (must not exist)")
        command.add_argument(
            "--dtype",
            choices=sorted(NUMPY_DTYPES),
            help="cast the weights (default: keep the stored dtype)",
        )
    return parser


if __name__ == "__main__":
    _run_command()
