"""The paper's quality comparison at toy scale on CPU: dense vs DGA, trained and evaluated alike,
and the baselines (StreamingLLM, LM-Infinite, MInference) on the dense-trained model.

    python benchmarks/eval_replication.py             # ~30 min on 2 cores
    python benchmarks/eval_replication.py --quick     # minutes: CI's shortened version

A quick run works in `<out>/quick/` (read `<out>` below as that), so it never mixes its corpus,
models or records with a full run's.

1. writes the retrieval corpus (`dga_jax.eval.synthetic`: the sample corpus's Python sources
   mixed with passkey- and lines-style documents in the evaluation's formats, other fillers and
   ids) into `<out>/corpus/` unless it holds one written with the same sizes and seed (its
   `corpus.json`); one written with others is replaced;
2. trains `configs/tiny_retrieval_dense.py` and `configs/tiny_retrieval_dga.py` (2K context),
   side by side, unless their final model exists;
3. evaluates each checkpoint under each attention (dense-trained evaluated with DGA and the
   reverse too; the dense-trained one under the baselines, training-free as in the paper, with
   windows and budgets scaled to the context: `baseline_settings`) on passkey (a length x depth
   grid), lines and held-out perplexity, through `dga_jax.eval.evaluate`, resumably
   (perplexity on the sample corpus's held-out sources);
4. writes `<out>/replication.md` (one table per task, rows = trained with / evaluated with)
   and `<out>/replication.json`; each run's records, plots and summary lie in `<out>/<run>/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from common import environment, out_dir
from replication_report import analysis_report, report

from dga_jax.checkpoint.orbax_io import attention_changes, load_model
from dga_jax.data.corpus import default_corpus_dir
from dga_jax.data.slimpajama import list_shards, read_shard
from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.eval import (
    Lines,
    ModelEngine,
    Passkey,
    Perplexity,
    analysis,
    dga_analysis,
    evaluate,
    one_line,
    with_bos,
)
from dga_jax.eval.synthetic import SET_NAME, write_retrieval_corpus
from dga_jax.eval.task import json_text, replace_text
from dga_jax.generate import Buckets

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("dense", "dga")
BASELINES = ("streaming_llm", "lm_infinite", "minference")
EVALUATED = {"dense": (*KINDS, *BASELINES), "dga": KINDS}  # trained -> evaluated with
CORPUS_SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=out_dir, default=ROOT / "runs" / "replication")
    p.add_argument("--quick", action="store_true", help="few steps, short contexts (CI)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # the trainers run in ROOT: a relative path would move
    return args


def sizes(quick: bool) -> dict:
    """Context, steps and evaluation sizes of the full and the quick run."""
    if quick:
        return dict(
            seq_len=768,
            steps=2,
            documents=(40, 8),
            max_chars=668,
            passkey=[40, 200],
            trials=1,
            depths=[0.0, 1.0],
            lines=[1, 2],
            cases=1,
            ppl_docs=1,
            analysis_lengths=[256],
            analysis_rows=2,
            sigmas=[0.1],
        )
    return dict(
        seq_len=2048,
        steps=600,
        documents=(8000, 400),
        max_chars=1900,  # the corpus of `python -m dga_jax.eval.synthetic`'s defaults
        passkey=[256, 768, 1280, 1664],
        trials=10,
        depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        lines=[5, 12, 20, 28],
        cases=20,
        ppl_docs=40,
        analysis_lengths=[256, 512, 1024, 2048],
        analysis_rows=8,
        sigmas=[0.05, 0.1, 0.2],
    )


def workdir(out: Path, quick: bool) -> Path:
    """Where a run keeps its corpus, models, records and report: `out`, or `out/quick`."""
    return out / "quick" if quick else out


def ensure_corpus(corpus: Path, size: dict) -> None:
    """Writes the retrieval corpus unless `corpus/corpus.json` says it was written with the
    same sizes and seed; the splits of one written with others (or unknown ones) are replaced."""
    params = {
        "documents_per_split": list(size["documents"]),
        "max_chars": size["max_chars"],
        "seed": CORPUS_SEED,
    }
    record = corpus / "corpus.json"
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        stored = None
    if stored == params:
        return
    if stored is not None or (corpus / "train").exists():
        print(f"{corpus} was written with other parameters ({stored}): rewriting it for {params}")
    for split in ("train", "validation"):
        shutil.rmtree(corpus / split, ignore_errors=True)
    write_retrieval_corpus(
        corpus,
        documents_per_split=size["documents"],
        max_chars=size["max_chars"],
        seed=CORPUS_SEED,
    )
    replace_text(record, json.dumps(params) + "\n")


def train_all(corpus: Path, out: Path, size: dict) -> dict[str, Path]:
    """Trains the models whose final export is missing, all at once (each a process; on 2
    cores two runs side by side take about as long as the slower one alone would with both
    cores); returns each kind's final export. One that fails stops the others."""
    finals = {kind: out / f"train_{kind}" / "model" / str(size["steps"]) for kind in KINDS}
    runs = [train(kind, corpus, out, size) for kind in KINDS if not finals[kind].is_dir()]
    try:
        for run in runs:
            if run.wait():
                raise RuntimeError(f"training failed: {' '.join(run.args)}")
    finally:
        for run in runs:
            if run.poll() is None:
                run.terminate()
                run.wait()
    return finals


def train(kind: str, corpus: Path, out: Path, size: dict) -> subprocess.Popen:
    """Starts training the `kind` model into out/train_<kind>."""
    command = [
        sys.executable,
        "-m",
        "train",
        f"--config=configs/tiny_retrieval_{kind}.py",
        f"--workdir={out / f'train_{kind}'}",
        f"--config.data.train={corpus}/train",
        f"--config.data.validation={corpus}/validation",
        f"--config.data.seq_len={size['seq_len']}",
        f"--config.model.overrides.max_position={size['seq_len']}",
        f"--config.train.steps={size['steps']}",
    ]
    if size["steps"] < 200:
        command += [
            f"--config.train.eval_every={size['steps']}",
            f"--config.train.checkpoint_every={size['steps']}",
        ]
    return subprocess.Popen(command, cwd=ROOT)


def tasks(corpus: Path, size: dict) -> list:
    return [
        Passkey(size["passkey"], size["trials"], size["depths"]),
        Lines(size["lines"], size["cases"], seed=1),
        # held-out Python sources only: the synthetic documents would mix in their own curve
        Perplexity(str(default_corpus_dir() / "validation"), max_documents=size["ppl_docs"]),
    ]


def baseline_settings(seq_len: int) -> dict[str, dict[str, int]]:
    """The baselines' settings at a context of seq_len tokens: their windows and budgets are
    made for 4K-128K contexts, so they are scaled to see a similar share of a short one
    (at 2K: 4 sinks + 256 recent tokens; 10 global + 512 local, distance cap 512; 128 columns
    + 256 diagonals per head)."""
    return {
        "streaming_llm": {"start_size": 4, "recent_size": seq_len // 8},
        "lm_infinite": {
            "global_size": 10,
            "local_size": seq_len // 4,
            "limit_distance": seq_len // 4,
        },
        "minference": {"vertical_size": seq_len // 16, "slash_size": seq_len // 8},
    }


def run(checkpoint: Path, attention: str, corpus: Path, out: Path, size: dict) -> dict:
    """Evaluates one checkpoint under one attention; the summary dict."""
    settings = baseline_settings(size["seq_len"]).get(attention)
    model = load_model(checkpoint, **attention_changes(checkpoint, attention, settings=settings))
    engine = ModelEngine(model, ByteTokenizer(), batch_size=8, buckets=Buckets(256))
    info = {"checkpoint": str(checkpoint), "attention": attention, "settings": settings}
    summary = evaluate(tasks(corpus, size), engine, out, info=info)
    print(f"{checkpoint.parent.parent.name} evaluated with {attention}: {one_line(summary)}")
    return summary


def validation_tokens(corpus: Path, length: int, count: int) -> np.ndarray:
    """`count` rows of `length` byte tokens from the held-out Python sources, end to end."""
    tokenizer, ids = ByteTokenizer(), []
    for path in list_shards(str(corpus / "validation")):
        for record in read_shard(path):
            if record["meta"]["redpajama_set_name"] != SET_NAME:
                ids += with_bos(tokenizer, record["text"])
            if len(ids) >= length * count:
                return np.asarray(ids[: length * count], np.int32).reshape(count, length)
    raise ValueError(f"the held-out text has fewer than {length * count} tokens")


def analyses(checkpoints: dict[str, Path], corpus: Path, out: Path, size: dict) -> dict:
    """P_sparse against L for both trained models, noise KL dense vs DGA on each, DGA's mass
    shares per layer on the DGA-trained one; plots in out/."""
    rows = {
        L: validation_tokens(corpus, L, size["analysis_rows"]) for L in size["analysis_lengths"]
    }
    longest = rows[max(rows)]
    result: dict = {"p_sparse": {}, "noise_kl": {}}
    for kind, checkpoint in checkpoints.items():
        model = load_model(checkpoint)
        estimates = analysis.p_sparse(model, rows, rho=0.01)
        result["p_sparse"][kind] = {L: e.mean for L, e in estimates.items()}
        key = jax.random.key(0)
        result["noise_kl"][kind] = analysis.compare_noise_kl(model, longest, size["sigmas"], key)
        if kind == "dga":
            result["mass"] = dga_analysis.dga_mass_shares(model, longest)
            dga_analysis.plot_mass_shares(result["mass"], out / "dga_mass_shares.png")
        result.setdefault("_estimates", {})[f"trained {kind}"] = estimates
    analysis.plot_p_sparse(result.pop("_estimates"), out / "p_sparse.png")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = sizes(args.quick)
    out = workdir(args.out, args.quick)
    corpus = out / "corpus"
    ensure_corpus(corpus, size)
    checkpoints = train_all(corpus, out, size)
    results = {
        (trained, evaluated): run(
            checkpoints[trained], evaluated, corpus, out / f"{trained}_as_{evaluated}", size
        )
        for trained, kinds in EVALUATED.items()
        for evaluated in kinds
    }
    result = analyses(checkpoints, corpus, out, size)
    text = report(results, size, baseline_settings(size["seq_len"]))
    text += "\n\n" + analysis_report(result, size)
    replace_text(out / "replication.md", text + "\n")
    flat = {f"{t}_as_{e}": s for (t, e), s in results.items()}
    payload = {"environment": environment(), "sizes": size, "runs": flat, "analyses": result}
    replace_text(out / "replication.json", json_text(payload))
    print(text)


if __name__ == "__main__":
    main()
