"""`eval_replication.py`'s report: the Markdown tables of its runs (passkey, lines, teacher-forced
answers, perplexity; trained with x evaluated with) and of its analyses (P_sparse, noise KL, DGA
attention mass)."""

from __future__ import annotations


def analysis_report(result: dict, size: dict) -> str:
    """P_sparse, noise KL and mass-share tables."""
    lengths = size["analysis_lengths"]
    p = [
        "| trained | " + " | ".join(f"L={L}" for L in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    p += [
        f"| {k} | " + " | ".join(f"{v[L]:.3f}" for L in lengths) + " |"
        for k, v in result["p_sparse"].items()
    ]
    sigmas = size["sigmas"]
    kl = [
        "| trained | evaluated | " + " | ".join(f"sigma={s}" for s in sigmas) + " |",
        "|---|---|" + "---:|" * len(sigmas),
    ]
    for trained, by_kind in result["noise_kl"].items():
        kl += [
            f"| {trained} | {kind} | " + " | ".join(f"{v[s]:.4f}" for s in sigmas) + " |"
            for kind, v in by_kind.items()
        ]
    mass = ["| layer | focal | group | raw |", "|---:|---:|---:|---:|"]
    mass += [
        f"| {i} | {m['focal']:.3f} | {m['group']:.3f} | {m['raw']:.3f} |"
        for i, m in enumerate(result["mass"])
    ]
    return "\n\n".join(
        [
            "### P_sparse(L, rho = 0.01), held-out text\n\n" + "\n".join(p),
            "### Noise robustness: KL(clean || noisy embeddings)\n\n" + "\n".join(kl),
            "### DGA attention mass (DGA-trained model)\n\n" + "\n".join(mass),
        ]
    )


def table(results: dict, task: str, columns: list[tuple[str, str]]) -> str:
    """Rows: trained with x evaluated with; columns: (label, metric path "a/b")."""
    head = "| trained | evaluated | " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|---|---|" + "---:|" * len(columns)]
    for (trained, evaluated), summary in results.items():
        metrics = summary["tasks"][task]["metrics"]
        cells = [_lookup(metrics, path) for _, path in columns]
        lines.append(f"| {trained} | {evaluated} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lookup(metrics: dict, path: str) -> str:
    value = metrics
    for part in path.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "n/a"
    return (
        f"{value:.3f}" if path.startswith("ppl") or "by_position" in path else f"{100 * value:.1f}"
    )


def report(results: dict, size: dict, baselines: dict[str, dict[str, int]]) -> str:
    """The Markdown tables of every task, passkey and lines in % correct; `baselines`: the
    baselines' settings (`eval_replication.baseline_settings`)."""
    passkey = [(f"{c} chars", f"by_length/{c}") for c in size["passkey"]] + [("all", "accuracy")]
    lines = [(f"{n} lines", f"by_lines/{n}") for n in size["lines"]] + [("all", "accuracy")]
    forced_passkey = [
        (f"{c} chars", f"answer_token_accuracy_by_length/{c}") for c in size["passkey"]
    ]
    forced_lines = [(f"{n} lines", f"answer_token_accuracy_by_lines/{n}") for n in size["lines"]]
    any_summary = next(iter(results.values()))
    positions = list(any_summary["tasks"]["ppl"]["metrics"]["by_position"])[-3:]
    ppl = [("PPL", "ppl")] + [(f"pos {p}", f"by_position/{p}") for p in positions]
    settings = "; ".join(
        f"{kind} " + ", ".join(f"{k}={v}" for k, v in values.items())
        for kind, values in baselines.items()
    )
    return "\n\n".join(
        [
            f"Baselines evaluated on the dense-trained model, at {settings}.",
            "### Passkey retrieval (% exact)\n\n" + table(results, "passkey", passkey),
            "### LongEval lines (% EM)\n\n" + table(results, "lines", lines),
            "### Teacher-forced answers: % of answer tokens that are the argmax\n\n"
            + table(results, "passkey", forced_passkey)
            + "\n\n"
            + table(results, "lines", forced_lines),
            "### Held-out perplexity (stride convention)\n\n" + table(results, "ppl", ppl),
        ]
    )
