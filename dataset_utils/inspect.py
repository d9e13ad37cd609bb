"""``text2sql data inspect``: look at the data an experiment would train on, before training.

For the experiment's sources (or any `SourceSpec` list) and its tokenizer and chat format:

- subset sizes per source: rows in each difficulty bucket (easy / medium / hard by the recipe's
  word count, and ``unbucketed`` for rows outside 10-800 words), plus gretel's own complexity
  labels where present, and how many rows the experiment's ``subset`` / ``number_of_samples`` /
  ``complexity`` keep;
- the token length (prompt + completion, exactly as `dataset_utils.formatting.tokenize_examples`
  builds it) of every kept row: summary statistics and a histogram PNG with a vertical line at
  the experiment's ``max_length``;
- how many rows each candidate ``max_length`` would drop (rows are dropped, never truncated);
- N rendered examples (prompt and completion text, as the model sees them). For an experiment
  (``text2sql data inspect``: `trainer.cli_model.run_inspect`) they are drawn from the
  training split the trainer itself builds (`trainer.training_data.build_datasets`, the
  same call as the training job), so they
  show its SQL style (``data.sql_style: dealiased``: table names instead of T1/T2 aliases),
  split and length policy. Subset counts and the length histogram are measured on the subset
  before de-duplication, splitting and the SQL style.

Files go to ``--out`` (default ``./data-inspect/``, created under the current directory):
``token_lengths.png``, ``summary.json`` and ``examples.txt``. Nothing else is written; the
tokenizer and data are only read.

The CLI wiring lives in ``trainer/cli.py``: it adds `add_inspect_arguments` to a ``data
inspect`` sub-parser and calls `trainer.cli_model.run_inspect`, which loads the experiment,
its tokenizer and the trainer's own split (layers above this one) and calls `inspect_data`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.formatting import (
    IGNORE_INDEX,
    plan_format,
    render_completion,
    render_prompt,
    tokenize_examples,
)
from dataset_utils.pipeline import PreparedData
from dataset_utils.records import Example
from dataset_utils.sources import SourceSpec, load_source
from dataset_utils.subsets import DIFFICULTY_BUCKETS, deduplicate, select_subset, with_difficulty

DEFAULT_OUT = Path("data-inspect")
DEFAULT_CANDIDATES = (256, 512, 768, 1024, 1536, 2048)
BUCKET_NAMES = (*DIFFICULTY_BUCKETS, "unbucketed")


@dataclass
class SourceStats:
    """Row counts of one source, before any subset is taken."""

    format: str
    origin: str
    rows: int
    buckets: dict[str, int]  # easy / medium / hard / unbucketed
    complexity: dict[str, int] = field(default_factory=dict)  # gretel's sql_complexity labels


@dataclass
class RenderedExample:
    index: int  # position in the kept subset, or in the trainer's train split (`split`)
    source: str
    difficulty: str | None
    tokens: int
    prompt: str
    completion: str
    split: str = "subset"  # "train": a row of the trainer's own training split


@dataclass
class InspectReport:
    """Everything `inspect_data` measured; `format_text` renders it for a terminal."""

    sources: list[SourceStats]
    subset: str
    number_of_samples: int | None
    complexity: list[str]
    rows_in_subset: int
    duplicates: int  # repeated (question, schema) pairs that the split would remove
    chat_format: str
    max_length: int
    lengths: list[int]  # prompt + completion tokens of every kept row, in subset order
    completion_lengths: list[int]
    drops: dict[int, int]  # candidate max_length -> rows longer than it (dropped)
    examples: list[RenderedExample]
    out_dir: Path
    histogram: Path
    files: dict[str, Path] = field(default_factory=dict)
    sql_style: str | None = None  # of the rendered examples, when they come from the pipeline

    def length_stats(self) -> dict[str, float]:
        return _stats(self.lengths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [asdict(s) for s in self.sources],
            "subset": self.subset,
            "number_of_samples": self.number_of_samples,
            "complexity": self.complexity,
            "rows_in_subset": self.rows_in_subset,
            "duplicates": self.duplicates,
            "chat_format": self.chat_format,
            "max_length": self.max_length,
            "token_length": self.length_stats(),
            "completion_token_length": _stats(self.completion_lengths),
            # JSON keys are strings; keep them sorted numerically.
            "dropped_by_max_length": {str(k): v for k, v in sorted(self.drops.items())},
            "sql_style": self.sql_style,
            "examples": [asdict(e) for e in self.examples],
            "files": {k: str(v) for k, v in self.files.items()},
        }

    def format_text(self) -> str:
        lines = [f"chat format: {self.chat_format}; experiment max_length: {self.max_length}"]
        if self.sql_style is not None:
            lines[0] += f"; examples in the trainer's sql_style: {self.sql_style}"
        lines.append("")
        head = f"{'source':<44} {'rows':>7}" + "".join(f" {b:>10}" for b in BUCKET_NAMES)
        lines += [head, "-" * len(head)]
        for s in self.sources:
            name = f"{s.format} ({Path(s.origin).name})"
            counts = "".join(f" {s.buckets[b]:>10}" for b in BUCKET_NAMES)
            lines.append(f"{name[:44]:<44} {s.rows:>7}{counts}")
            if s.complexity:
                labels = ", ".join(f"{k}: {v}" for k, v in sorted(s.complexity.items()))
                lines.append(f"    complexity labels: {labels}")
        total = {b: sum(s.buckets[b] for s in self.sources) for b in BUCKET_NAMES}
        lines.append(
            f"{'total':<44} {sum(s.rows for s in self.sources):>7}"
            + "".join(f" {total[b]:>10}" for b in BUCKET_NAMES)
        )
        lines.append("")
        extra = []
        if self.number_of_samples is not None:
            extra.append(f"number_of_samples {self.number_of_samples}")
        if self.complexity:
            extra.append(f"complexity {self.complexity}")
        lines.append(
            f"subset {self.subset!r}"
            + (f" ({', '.join(extra)})" if extra else "")
            + f": {self.rows_in_subset} rows; {self.duplicates} repeated (question, schema) "
            "pairs will be removed before splitting"
        )
        st, cst = self.length_stats(), _stats(self.completion_lengths)
        lines.append(
            "tokens per row (prompt + completion): "
            f"min {st['min']:.0f}, median {st['median']:.0f}, mean {st['mean']:.0f}, "
            f"p90 {st['p90']:.0f}, p99 {st['p99']:.0f}, max {st['max']:.0f}"
        )
        lines.append(
            f"completion tokens (SQL + end of turn): median {cst['median']:.0f}, "
            f"p99 {cst['p99']:.0f}, max {cst['max']:.0f}"
        )
        lines += ["", f"{'max_length':>10}  {'dropped':>8}  {'of rows':>8}"]
        n = max(self.rows_in_subset, 1)
        for length, dropped in sorted(self.drops.items()):
            mark = "  <- experiment" if length == self.max_length else ""
            lines.append(f"{length:>10}  {dropped:>8}  {100 * dropped / n:>7.1f}%{mark}")
        lines.append("")
        for i, e in enumerate(self.examples, 1):
            where = "train split row" if e.split == "train" else "row"
            lines.append(
                f"=== example {i} of {len(self.examples)} ({where} {e.index}, {e.source}, "
                f"{e.difficulty or 'unbucketed'}, {e.tokens} tokens) ==="
            )
            lines += ["--- prompt ---", e.prompt, "--- completion ---", e.completion, ""]
        lines.append(f"histogram: {self.histogram}")
        for name, path in self.files.items():
            if path != self.histogram:
                lines.append(f"{name}: {path}")
        return "\n".join(lines)


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile: a value that really occurs (a token count)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {k: 0.0 for k in ("min", "median", "mean", "p90", "p99", "max")}
    s = sorted(values)
    return {
        "min": float(s[0]),
        "median": float(statistics.median(s)),
        "mean": round(statistics.fmean(s), 1),
        "p90": _percentile(s, 90),
        "p99": _percentile(s, 99),
        "max": float(s[-1]),
    }


def source_stats(spec: SourceSpec, examples: Sequence[Example], origin: str) -> SourceStats:
    rows = with_difficulty(examples)
    counts = Counter(e.difficulty or "unbucketed" for e in rows)
    return SourceStats(
        format=spec.format,
        origin=origin,
        rows=len(rows),
        buckets={b: counts.get(b, 0) for b in BUCKET_NAMES},
        complexity=dict(Counter(e.complexity for e in rows if e.complexity)),
    )


def plot_histogram(lengths: Sequence[int], max_length: int, path: Path, title: str) -> Path:
    """Token-length histogram with a vertical line at ``max_length`` (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        upper = max(max(lengths, default=0), max_length)
        bins = min(60, max(10, len(set(lengths))))
        ax.hist(lengths, bins=bins, range=(0, upper * 1.02), color="#4C72B0", edgecolor="white")
        dropped = sum(n > max_length for n in lengths)
        ax.axvline(
            max_length,
            color="#C44E52",
            linestyle="--",
            linewidth=2,
            label=f"max_length = {max_length} ({dropped} of {len(lengths)} rows dropped)",
        )
        ax.set_xlabel("tokens per row (prompt + completion)")
        ax.set_ylabel("rows")
        ax.set_title(title)
        ax.legend(loc="upper right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def inspect_data(
    sources: Sequence[SourceSpec],
    tokenizer: Any,
    *,
    chat_format: str = "auto",
    subset: str = "all",
    number_of_samples: int | None = None,
    complexity: Sequence[str] | None = None,
    max_length: int = 1024,
    candidate_lengths: Sequence[int] = DEFAULT_CANDIDATES,
    n_examples: int = 3,
    out_dir: Path = DEFAULT_OUT,
    seed: int = 0,
    data_dir: Path | None = None,
    prepared: PreparedData | None = None,
) -> InspectReport:
    """Measure the data (see the module docstring) and write the PNG / JSON / examples files.

    Rendered examples are ``n_examples`` rows drawn at random (``seed``) from ``prepared``'s
    training split (what `dataset_utils.pipeline.prepare_data` made for the trainer), else
    from the kept subset, shown in order, so that several sources are represented.
    """
    if not sources:
        raise UserError("data inspect needs at least one source")
    if max_length <= 0:
        raise UserError(f"max_length must be positive, found {max_length}")
    bad = [c for c in candidate_lengths if c <= 0]
    if bad:
        raise UserError(f"--max-length values must be positive integers, found {bad}")
    if n_examples < 0:
        raise UserError(f"--examples must be >= 0, found {n_examples}")
    plan = plan_format(chat_format, tokenizer)
    loaded = [load_source(s, data_dir) for s in sources]
    stats = [source_stats(s.spec, s.examples, s.origin) for s in loaded]
    rows = [e for s in loaded for e in s.examples]
    kept = select_subset(rows, subset, number_of_samples, complexity)
    _, duplicates = deduplicate(kept)

    tok = tokenize_examples(kept, tokenizer, plan, None)
    lengths = [len(ids) for ids in tok.input_ids]
    completion_lengths = [sum(x != IGNORE_INDEX for x in lab) for lab in tok.labels]
    candidates = sorted({*candidate_lengths, max_length})
    drops = {c: sum(n > c for n in lengths) for c in candidates}

    pool, split, pool_plan = kept, "subset", plan
    if prepared is not None:
        pool, split, pool_plan = prepared.examples["train"], "train", prepared.plan
    picks = sorted(random.Random(seed).sample(range(len(pool)), min(n_examples, len(pool))))
    pool_lengths: Sequence[int] | dict[int, int] = lengths
    if prepared is not None:
        counts = _token_counts([pool[i] for i in picks], tokenizer, pool_plan)
        pool_lengths = dict(zip(picks, counts, strict=True))
    examples = [
        RenderedExample(
            index=i,
            source=pool[i].source,
            difficulty=pool[i].difficulty,
            tokens=pool_lengths[i],
            prompt=render_prompt(pool[i], tokenizer, pool_plan),
            completion=render_completion(pool[i], pool_plan),
            split=split,
        )
        for i in picks
    ]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{len(lengths)} rows, subset {subset!r}, chat format {plan.chat_format}"
    histogram = plot_histogram(lengths, max_length, out_dir / "token_lengths.png", title)
    report = InspectReport(
        sources=stats,
        subset=subset,
        number_of_samples=number_of_samples,
        complexity=list(complexity or []),
        rows_in_subset=len(kept),
        duplicates=duplicates,
        chat_format=plan.chat_format,
        max_length=max_length,
        lengths=lengths,
        completion_lengths=completion_lengths,
        drops=drops,
        examples=examples,
        out_dir=out_dir,
        histogram=histogram,
        sql_style=prepared.report.get("sql_style") if prepared is not None else None,
    )
    report.files = {
        "histogram": histogram,
        "summary": out_dir / "summary.json",
        "examples": out_dir / "examples.txt",
    }
    report.files["summary"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", "utf-8")
    report.files["examples"].write_text(
        "".join(
            f"=== row {e.index} ({e.source}, {e.tokens} tokens) ===\n{e.prompt}{e.completion}\n\n"
            for e in examples
        ),
        "utf-8",
    )
    return report


def _token_counts(rows: Sequence[Example], tokenizer: Any, plan: Any) -> list[int]:
    return [len(ids) for ids in tokenize_examples(rows, tokenizer, plan, None).input_ids]


# --------------------------------------------------------------------------------------------
# Command line: `text2sql data inspect EXPERIMENT.yaml ...`


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``text2sql data inspect`` (the caller sets ``func=run_inspect``)."""
    parser.add_argument(
        "experiment", help="experiment YAML whose hyperparameters.data and .model to inspect"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyperparameter first, as for `text2sql run` "
        "(e.g. data.subset=medium); repeatable",
    )
    parser.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="folder for token_lengths.png, summary.json and examples.txt "
        f"(default: ./{DEFAULT_OUT}/ under the current directory)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=3,
        metavar="N",
        help="how many rendered examples (prompt + completion) to print (default 3)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        nargs="+",
        action="extend",
        default=None,
        metavar="L",
        help="candidate max_length values to count drops for (default: "
        f"{', '.join(map(str, DEFAULT_CANDIDATES))}; the experiment's own value is always "
        "included)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which random examples (default 0)")
