"""Long-context evaluation: passkey, LongEval lines, LongBench-E, perplexity, the paper's analyses.

    python -m dga_jax.eval --checkpoint DIR --tokenizer PATH --tasks passkey,lines --out DIR

    engine = ModelEngine(model, tokenizer, batch_size=8)
    summary = evaluate([Passkey(longlora_lengths(8192)), Lines()], engine, "eval/out")

Tasks see a model only through an `Engine` (`engine.py`); `runner.py` makes a run resumable
and writes its records, summary, table and plots. The lm-evaluation-harness backend is
`dga_jax.eval.harness` (needs the `eval` extra).
"""

from dga_jax.eval.engine import Engine, ModelEngine, TokenScores, with_bos
from dga_jax.eval.lines import Lines
from dga_jax.eval.passkey import Passkey, longlora_lengths
from dga_jax.eval.ppl import Perplexity
from dga_jax.eval.runner import evaluate, one_line, run_task
from dga_jax.eval.task import Example, GenerationTask, Problems, Summary, Task

__all__ = [
    "Engine",
    "Example",
    "GenerationTask",
    "Lines",
    "ModelEngine",
    "Passkey",
    "Perplexity",
    "Problems",
    "Summary",
    "Task",
    "TokenScores",
    "evaluate",
    "longlora_lengths",
    "one_line",
    "run_task",
    "with_bos",
]
