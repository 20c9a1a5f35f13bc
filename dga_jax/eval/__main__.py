"""Evaluate a checkpoint: `python -m dga_jax.eval --checkpoint DIR --tokenizer PATH --tasks ...`.

    python -m dga_jax.eval --checkpoint ckpt/7b --tokenizer tokenizer.model --out eval/7b_dga \\
        --tasks passkey,lines,longbench_e,ppl --longbench_dir LongBench/data --ppl_data pg19/test
    python -m dga_jax.eval ... --attention dense   # the same weights under dense attention

Writes `<task>.jsonl` (one record per example; a rerun skips those already there),
`summary.json`, `results.md` and plots to --out, and prints one summary line. Input errors
(a missing file, a bad flag value) exit with status 2 and a message naming the problem; Ctrl-C
exits with status 130, keeping the records written so far (the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax

from dga_jax.checkpoint.orbax_io import (
    attention_changes,
    load_config,
    load_model,
    parse_settings,
)
from dga_jax.data.tokenizers import BYTE_SPEC, load_tokenizer
from dga_jax.errors import InputError
from dga_jax.eval.engine import ModelEngine
from dga_jax.eval.lines import STANDARD_SIZES, Lines
from dga_jax.eval.passkey import Passkey, longlora_lengths
from dga_jax.eval.ppl import CONVENTIONS, Perplexity
from dga_jax.eval.runner import evaluate, one_line
from dga_jax.eval.task import Task
from dga_jax.generate import Buckets
from dga_jax.model.config import ATTENTION_KINDS, ModelConfig
from dga_jax.ops.dga.config import SELECTIONS
from dga_jax.sharding import make_mesh, mesh_shape

TASKS = ("passkey", "lines", "longbench_e", "ppl")


def _ints(text: str) -> list[int]:
    return _listed(text, int)


def _floats(text: str) -> list[float]:
    return _listed(text, float)


def _listed(text: str, kind: Callable[[str], Any]) -> list[Any]:
    """An argparse type: a comma list of at least one `kind` (an empty one, e.g. an unset
    shell variable, is an error: `--passkey_lengths ""` fell back to the defaults)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must list at least one number, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    """An argparse type: a comma list of at least one name (an empty one is an error, as in
    `_listed`: `--longbench_datasets ""` ran all 13 datasets)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must list at least one name, got {text!r}")
    return names


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least` (argparse names the flag of a bad value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dga_jax.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="directory written by save_model")
    p.add_argument("--tokenizer", required=True, help="'byte', a *.model or tokenizer.json")
    p.add_argument("--tasks", type=_names, default=["passkey", "lines"], help=f"of {TASKS}")
    p.add_argument("--out", required=True, help="output directory (reused: resumes)")
    m = p.add_argument_group("model")
    m.add_argument("--attention", choices=ATTENTION_KINDS, help="default: the checkpoint's")
    m.add_argument("--selection", choices=SELECTIONS, help="DGA selection; default: stored")
    m.add_argument("--group_size", type=int, help="DGA m; default: stored")
    m.add_argument("--focal_ratio", type=float, help="DGA gamma; default: stored")
    m.add_argument(
        "--attention_settings",
        default="",
        help="the baselines' fields, e.g. start_size=4,recent_size=2000 (streaming_llm) or "
        "global_size=10,local_size=4096,limit_distance=4096 (lm_infinite) or "
        "vertical_size=1000,slash_size=6096 (minference); default: stored",
    )
    m.add_argument(
        "--max_length", type=_at_least(2), help="tokens per sequence; default max_position"
    )
    m.add_argument("--batch_size", type=_at_least(1), default=8)
    m.add_argument(
        "--bucket", type=_at_least(1), default=128, help="smallest padded length (pow2 up)"
    )
    m.add_argument(
        "--mesh",
        type=_ints,
        default=[1, -1, 1, 1],
        help="data,fsdp,seq,tensor device counts; -1: the rest",
    )
    m.add_argument("--chunk", type=_at_least(1), default=32, help="examples per written chunk")
    t = p.add_argument_group("tasks")
    t.add_argument(
        "--passkey_lengths",
        type=_ints,
        help="filler characters per point; default LongLoRA's up to --max_length",
    )
    t.add_argument("--passkey_trials", type=_at_least(1), default=10)
    t.add_argument("--passkey_depths", type=_floats, help="e.g. 0,0.25,0.5,0.75,1: a grid")
    t.add_argument("--lines_sizes", type=_ints, default=list(STANDARD_SIZES))
    t.add_argument("--lines_cases", type=_at_least(1), default=50)
    t.add_argument("--lines_seed", type=_at_least(0), default=0)
    t.add_argument("--lines_dir", help="LongChat's lines/testcases directory (else generated)")
    t.add_argument("--longbench_dir", help="directory of LongBench-E {dataset}_e.jsonl files")
    t.add_argument("--longbench_datasets", type=_names, help="default: the 13 of LongBench-E")
    t.add_argument(
        "--longbench_max_input", type=_at_least(2), help="prompt tokens kept (middle cut)"
    )
    t.add_argument("--model_name", help="pred_e/<model_name>/; default: checkpoint + attention")
    t.add_argument("--ppl_data", help="directory of .txt documents, or SlimPajama shards")
    t.add_argument("--ppl_window", type=_at_least(2), help="default: --max_length")
    t.add_argument(
        "--ppl_stride", type=_at_least(1), help="default: window // 2, or 256 (longlora)"
    )
    t.add_argument("--ppl_convention", choices=CONVENTIONS, default="stride")
    t.add_argument("--ppl_max_docs", type=_at_least(1))
    return p.parse_args(argv)


def fail(message: str) -> NoReturn:
    """Exits with status 2 and a message naming the problem (no traceback)."""
    sys.stderr.write(f"python -m dga_jax.eval: error: {message}\n")
    sys.exit(2)


def check_task_flags(args: argparse.Namespace) -> None:
    """The task names and the data flags they need: checked before the model loads (minutes
    for a 7B checkpoint), not after it."""
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        raise InputError(f"--tasks {','.join(args.tasks)!r}: each must be one of {TASKS}")
    if "ppl" in args.tasks and not args.ppl_data:
        raise InputError("--tasks ppl needs --ppl_data (a directory of .txt or shards)")
    if "longbench_e" in args.tasks and not args.longbench_dir:
        raise InputError("--tasks longbench_e needs --longbench_dir (LongBench's data folder)")


def build_tasks(args: argparse.Namespace, max_length: int) -> list[Task]:
    """The tasks named by --tasks, configured from their flags; a task named twice runs once
    (twice, its second run found every record there and reported 0 examples evaluated)."""
    check_task_flags(args)
    tasks: list[Task] = []
    for name in dict.fromkeys(args.tasks):
        if name == "passkey":
            tasks.append(_passkey(args, max_length))
        elif name == "lines":
            tasks.append(Lines(args.lines_sizes, args.lines_cases, args.lines_seed, args.lines_dir))
        elif name == "longbench_e":
            tasks.append(_longbench(args, max_length))
        else:
            tasks.append(_perplexity(args, max_length))
    return tasks


def _passkey(args: argparse.Namespace, max_length: int) -> Task:
    lengths = args.passkey_lengths or longlora_lengths(max_length)
    if not lengths:
        raise InputError(
            f"--tasks passkey: LongLoRA's lengths (one point per 1000 tokens) leave none in "
            f"max_length {max_length}; give --passkey_lengths (filler characters per point)"
        )
    return Passkey(lengths, args.passkey_trials, args.passkey_depths)


def _perplexity(args: argparse.Namespace, max_length: int) -> Task:
    task = Perplexity(
        args.ppl_data, args.ppl_window, args.ppl_stride, args.ppl_convention, args.ppl_max_docs
    )
    task.sizes(max_length)  # a bad window or stride ends the run now, not after other tasks
    return task


def _longbench(args: argparse.Namespace, max_length: int) -> Task:
    from dga_jax.eval.longbench import LongBenchE

    name = args.model_name or os.path.basename(os.path.abspath(args.checkpoint))  # "." too
    if args.attention:
        name += f"-{args.attention}"
    task = LongBenchE(
        args.longbench_dir,
        datasets=args.longbench_datasets,
        max_input=args.longbench_max_input,
        model_name=name,
    )
    task.check(max_length)  # a missing file ends the run now, not after the tasks before it
    return task


def run_info(args: argparse.Namespace, config: ModelConfig, max_length: int) -> dict[str, Any]:
    """What the run's records depend on beyond the tasks' flags (kept beside the records, so
    a rerun into the same --out with other ones is refused)."""
    settings = getattr(config, config.attention, None)  # the baselines' and DGA's fields
    return {
        "checkpoint": os.path.abspath(args.checkpoint),
        "attention": config.attention,
        "dga": dataclasses.asdict(config.dga),
        "attention_settings": dataclasses.asdict(settings) if settings is not None else None,
        "max_length": max_length,
        "tokenizer": _tokenizer_path(args.tokenizer),
    }


def _tokenizer_path(spec: str) -> str:
    """--tokenizer as a rerun compares it: a path made absolute (as typed, the same file
    typed another way was refused, and the same name in another directory resumed)."""
    return spec if spec == BYTE_SPEC else os.path.abspath(spec)


def _extrapolation(args: argparse.Namespace, config: ModelConfig) -> dict[str, int]:
    """A --max_length past the model's max_position asks to run it past its trained positions
    (length extrapolation): the model is loaded with max_position raised to it, with a warning.
    StreamingLLM and LM-Infinite cap every RoPE distance: any length is theirs already."""
    if not args.max_length or config.positions_fit(args.max_length):
        return {}
    logging.warning(
        "--max_length %d is past the model's max_position %d: positions beyond it extrapolate",
        args.max_length,
        config.max_position,
    )
    return {"max_position": args.max_length}


def make_out_dir(out: str) -> None:
    """Makes --out now, before the model loads: a path that cannot be the output directory (a
    file, no permission) ended the run only when its first records were to be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out!r} cannot be the output directory: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"--out {out!r} cannot be the output directory: it is not writable")


def main(argv: Sequence[str] | None = None) -> None:
    """Loads the checkpoint on a mesh, runs the tasks, prints the summary line."""
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint!r} is not a directory")
    try:
        check_task_flags(args)  # first: a mistyped task leaves no empty --out behind
        make_out_dir(args.out)
        tokenizer = load_tokenizer(args.tokenizer)
        mesh = make_mesh(mesh_shape(args.mesh, len(jax.devices()), "--mesh"))
        changes = attention_changes(
            args.checkpoint,
            args.attention,
            selection=args.selection,
            group_size=args.group_size,
            focal_ratio=args.focal_ratio,
            settings=parse_settings(args.attention_settings, "--attention_settings"),
        )
        config = load_config(args.checkpoint).replace(**changes)
        changes.update(_extrapolation(args, config))
        max_length = args.max_length or config.max_position
        tasks = build_tasks(args, max_length)  # before the model loads: minutes for a 7B
        model = load_model(args.checkpoint, mesh=mesh, **changes)
        engine = ModelEngine(
            model,
            tokenizer,
            batch_size=args.batch_size,
            buckets=Buckets(args.bucket),
            max_length=max_length,
            mesh=mesh,
        )
        info = run_info(args, model.config, max_length)
        summary = evaluate(tasks, engine, args.out, chunk=args.chunk, progress=True, info=info)
    except (InputError, ValueError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C: the records written so far stay, a rerun resumes
        sys.stderr.write(
            f"python -m dga_jax.eval: interrupted; the records written so far are in "
            f"{args.out}: rerun the same command to resume\n"
        )
        sys.exit(130)
    print(one_line(summary))


if __name__ == "__main__":
    main()
