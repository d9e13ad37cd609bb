"""Evaluation reports: JSON, Markdown and a bar chart, optionally logged to MLflow.

`write_report` takes one `EvalResult` per model label ("base", "adapter", ...) scored on the same
examples and writes into ``out_dir``:

- ``report.json``: title, per-model aggregates (overall, per difficulty, per Spider hardness,
  per complexity, error categories) and the per-example rows;
- ``report.md``: a summary table per model, per difficulty, per Spider hardness level and per
  error category, then one row per example (question, gold SQL, each model's SQL and verdict);
- ``per_example.csv``: the per-example rows (with each example's difficulty, hardness and
  each model's verdict category);
- ``exec_accuracy.png``: grouped bars of execution accuracy per difficulty, one bar per model;
  ``exec_accuracy_hardness.png``: the same per Spider hardness level (when examples carry
  one); ``errors.png``: how many predictions fall in each error category, per model
  (matplotlib, Agg backend -- no display needed).

`log_report_to_mlflow` logs the metrics (``{label}_exec_accuracy``,
``{label}_exec_accuracy_{difficulty}``, ``{label}_exec_accuracy_hardness_{level}``,
``{label}_error_{category}`` as a fraction of the examples, ...), the charts and the
per-example table to the active MLflow run, or to a new run when only ``MLFLOW_TRACKING_URI``
is set; otherwise it does nothing.

Usage::

    from evaluation.report import write_report, log_report_to_mlflow
    paths = write_report({"base": base_result, "adapter": tuned_result}, examples, "out/eval",
                         title="SmolLM2 on Spider dev")
    log_report_to_mlflow(paths, {"base": base_result, "adapter": tuned_result})
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dataset_utils.hardness import HARDNESS_LEVELS
from dataset_utils.records import Example
from evaluation.judge import ERROR_CATEGORIES, NO_LABEL, EvalResult, Metrics

DIFFICULTY_ORDER = ("easy", "medium", "hard")
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")


def _ordered_labels(labels: Sequence[str], order: Sequence[str] = DIFFICULTY_ORDER) -> list[str]:
    known = [d for d in order if d in labels]
    rest = sorted(lbl for lbl in labels if lbl not in order and lbl != NO_LABEL)
    return known + rest + ([NO_LABEL] if NO_LABEL in labels else [])


def _verdict(correct: bool | None) -> str:
    return "n/a" if correct is None else ("yes" if correct else "no")


def _md_cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def example_rows(
    results: Mapping[str, EvalResult], examples: Sequence[Example]
) -> list[dict[str, Any]]:
    """One flat dict per example: question, gold, difficulty and each model's SQL/verdict."""
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {
            "index": i,
            "question": ex.question,
            "gold": ex.sql,
            "difficulty": ex.difficulty or "",
            "hardness": ex.hardness or "",
            "db_id": ex.db_id or "",
        }
        for label, res in results.items():
            j = res.judgements[i]
            row[f"{label}_sql"] = j.pred_sql
            row[f"{label}_correct"] = _verdict(j.exec_correct)
            row[f"{label}_category"] = j.category
            row[f"{label}_error"] = j.error or ""
        rows.append(row)
    return rows


def _summary_table(results: Mapping[str, EvalResult]) -> list[str]:
    lines = [
        "| model | n | judgeable | exec. accuracy | exact match | valid SQL | executable | BLEU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, res in results.items():
        o = res.overall
        lines.append(
            f"| {label} | {o.n} | {o.n_judgeable} | {100 * o.exec_accuracy:.1f}% | "
            f"{100 * o.exact_match:.1f}% | {100 * o.valid_sql_rate:.1f}% | "
            f"{100 * o.executable_rate:.1f}% | {o.bleu:.1f} |"
        )
    return lines


def _group_table(
    results: Mapping[str, EvalResult],
    attr: str,
    name: str,
    order: Sequence[str] = DIFFICULTY_ORDER,
) -> list[str]:
    labels = _ordered_labels(sorted({k for r in results.values() for k in getattr(r, attr)}), order)
    if not labels:
        return []
    models = list(results)
    lines = [
        f"| {name} | n | " + " | ".join(f"{m} exec. acc." for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for lbl in labels:
        groups: list[Metrics | None] = [getattr(r, attr).get(lbl) for r in results.values()]
        n = next((g.n for g in groups if g is not None), 0)
        cells = [
            f"{100 * g.exec_accuracy:.1f}% ({g.n_correct}/{g.n_judgeable})" if g else "-"
            for g in groups
        ]
        lines.append(f"| {lbl} | {n} | " + " | ".join(cells) + " |")
    return lines


def _error_table(results: Mapping[str, EvalResult]) -> list[str]:
    """Rows: every verdict category; cells: count and share of the examples, per model."""
    models = list(results)
    counts = {m: results[m].categories() for m in models}
    lines = [
        "| verdict | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for category in ("correct", *ERROR_CATEGORIES, "unjudgeable"):
        cells = []
        for m in models:
            n = max(1, results[m].overall.n)
            cells.append(f"{counts[m][category]} ({100 * counts[m][category] / n:.1f}%)")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def _bars(
    series: Mapping[str, Sequence[float]],
    groups: Sequence[str],
    path: Path,
    *,
    title: str,
    ylabel: str,
    ylim: float | None = 105,
    fmt: str = "%.0f",
) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    models = list(series)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups)), 3.8))
    for m_i, model in enumerate(models):
        xs = [g_i + (m_i - (len(models) - 1) / 2) * width for g_i in range(len(groups))]
        bars = ax.bar(xs, list(series[model]), width=width, label=model)
        ax.bar_label(bars, fmt=fmt, fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    if ylim is not None:
        ax.set_ylim(0, ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(
    results: Mapping[str, EvalResult],
    path: Path,
    title: str,
    attr: str = "by_difficulty",
    order: Sequence[str] = DIFFICULTY_ORDER,
) -> None:
    """Execution accuracy overall and per group of ``attr`` (difficulty or hardness)."""
    labels = _ordered_labels(sorted({k for r in results.values() for k in getattr(r, attr)}), order)
    series = {
        model: [100 * res.overall.exec_accuracy]
        + [
            100 * getattr(res, attr)[g].exec_accuracy if g in getattr(res, attr) else 0.0
            for g in labels
        ]
        for model, res in results.items()
    }
    _bars(series, ["overall", *labels], path, title=title, ylabel="execution accuracy (%)")


def _plot_errors(results: Mapping[str, EvalResult], path: Path, title: str) -> None:
    groups = [*ERROR_CATEGORIES, "unjudgeable"]
    series = {model: [float(res.categories()[c]) for c in groups] for model, res in results.items()}
    _bars(
        series,
        [g.replace(" ", "\n", 1) for g in groups],
        path,
        title=title,
        ylabel="predictions",
        ylim=None,
        fmt="%d",
    )


def write_report(
    results: dict[str, EvalResult],
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    title: str,
    decoding: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, per_example.csv and the charts into ``out_dir``.

    ``decoding``: the decoding options the predictions were made with
    (`trainer.config.DecodingArgs` as a dict), recorded in the JSON and the Markdown.

    Returns ``{"json": ..., "markdown": ..., "png": ..., "csv": ..., "errors_png": ...}`` plus
    ``"hardness_png"`` when the examples carry a Spider hardness level.
    """
    if not results:
        raise ValueError("write_report needs at least one model result")
    for label, res in results.items():
        if len(res.judgements) != len(examples):
            raise ValueError(
                f"result {label!r} has {len(res.judgements)} judgements for "
                f"{len(examples)} examples"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = example_rows(results, examples)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "png": out / "exec_accuracy.png",
        "csv": out / "per_example.csv",
        "errors_png": out / "errors.png",
    }
    with_hardness = any(res.by_hardness for res in results.values())
    if with_hardness:
        paths["hardness_png"] = out / "exec_accuracy_hardness.png"

    payload = {
        "title": title,
        "decoding": dict(decoding or {}),
        "models": {
            label: {
                "overall": asdict(res.overall),
                "by_difficulty": {k: asdict(v) for k, v in res.by_difficulty.items()},
                "by_hardness": {k: asdict(v) for k, v in res.by_hardness.items()},
                "by_complexity": {k: asdict(v) for k, v in res.by_complexity.items()},
                "categories": res.categories(),
            }
            for label, res in results.items()
        },
        "examples": rows,
    }
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")

    with paths["csv"].open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)

    md = [f"# {title}", ""]
    if decoding:
        md += [f"Decoding: {describe_decoding(decoding)}.", ""]
    md += ["## Summary", "", *_summary_table(results), ""]
    by_diff = _group_table(results, "by_difficulty", "difficulty")
    if by_diff:
        md += ["## Execution accuracy per difficulty", "", *by_diff, ""]
    by_cx = _group_table(results, "by_complexity", "complexity")
    if by_cx:
        md += ["## Execution accuracy per complexity", "", *by_cx, ""]
    md += [
        "Execution accuracy is correct / judgeable; an example whose gold query fails is "
        "unjudgeable (n/a).",
        "",
        "![execution accuracy](exec_accuracy.png)",
        "",
    ]
    if with_hardness:
        md += [
            "## Execution accuracy per Spider hardness",
            "",
            "Levels by the official Spider evaluation rules (`dataset_utils/hardness.py`).",
            "",
            *_group_table(results, "by_hardness", "hardness", HARDNESS_LEVELS),
            "",
            "![execution accuracy per hardness](exec_accuracy_hardness.png)",
            "",
        ]
    md += [
        "## Errors",
        "",
        "Why each prediction is wrong: it does not run (no such table / column, syntax error, "
        "time-out, other execution error) or it runs and returns an empty or a wrong result.",
        "",
        *_error_table(results),
        "",
        "![errors](errors.png)",
        "",
        "## Per example",
        "",
        "| # | difficulty | hardness | question | gold | "
        + " | ".join(f"{m} SQL | {m} verdict" for m in results)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(results),
    ]
    for row in rows:
        cells = [
            str(row["index"]),
            row["difficulty"],
            row["hardness"],
            _md_cell(row["question"]),
            f"`{_md_cell(row['gold'])}`",
        ]
        for m in results:
            cells += [f"`{_md_cell(row[f'{m}_sql'])}`", row[f"{m}_category"]]
        md.append("| " + " | ".join(cells) + " |")
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")

    _plot(results, paths["png"], title)
    if with_hardness:
        _plot(
            results,
            paths["hardness_png"],
            f"{title}: per Spider hardness",
            "by_hardness",
            HARDNESS_LEVELS,
        )
    _plot_errors(results, paths["errors_png"], f"{title}: errors")
    return paths


def describe_decoding(decoding: Mapping[str, Any]) -> str:
    """``greedy``, ``beam 4 + execution-guided + schema-constrained`` ..."""
    k = int(decoding.get("num_beams", 1))
    parts = ["greedy" if k == 1 else f"beam search, {k} beams"]
    if decoding.get("execution_guided"):
        parts.append("execution-guided")
    if decoding.get("schema_constrained"):
        parts.append("schema-constrained")
    return " + ".join(parts)


def _metric_name(*parts: str) -> str:
    return _LABEL_SAFE.sub("_", "_".join(p for p in parts if p))


def report_metrics(results: Mapping[str, EvalResult]) -> dict[str, float]:
    """Flat MLflow metric names: ``{label}_exec_accuracy[_difficulty]`` and friends."""
    metrics: dict[str, float] = {}
    for label, res in results.items():
        o = res.overall
        metrics[_metric_name(label, "exec_accuracy")] = o.exec_accuracy
        metrics[_metric_name(label, "exact_match")] = o.exact_match
        metrics[_metric_name(label, "valid_sql")] = o.valid_sql_rate
        metrics[_metric_name(label, "executable")] = o.executable_rate
        metrics[_metric_name(label, "bleu")] = o.bleu
        metrics[_metric_name(label, "n_judgeable")] = float(o.n_judgeable)
        for group in (res.by_difficulty, res.by_complexity):
            for key, m in group.items():
                if key != NO_LABEL:
                    metrics[_metric_name(label, "exec_accuracy", key)] = m.exec_accuracy
        # Spider hardness reuses the difficulty names (easy/medium/hard): its own prefix.
        for key, m in res.by_hardness.items():
            if key != NO_LABEL:
                metrics[_metric_name(label, "exec_accuracy_hardness", key)] = m.exec_accuracy
        n = max(1, o.n)
        for category, count in res.categories().items():
            if category in ERROR_CATEGORIES:
                metrics[_metric_name(label, "error", category.replace(" ", "_"))] = count / n
    return metrics


def log_report_to_mlflow(
    paths: Mapping[str, Path], results: Mapping[str, EvalResult], *, run_name: str = "evaluation"
) -> str | None:
    """Log metrics, the chart and the per-example table to MLflow; returns the run id.

    Logs into the active run; with no active run but ``MLFLOW_TRACKING_URI`` set, opens (and
    closes) a run named ``run_name``; with neither, does nothing and returns None.
    """
    import mlflow

    active = mlflow.active_run()
    if active is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    started = False
    if active is None:
        active = mlflow.start_run(run_name=run_name)
        started = True
    try:
        mlflow.log_metrics(report_metrics(results))
        for key in ("png", "hardness_png", "errors_png", "markdown", "json"):
            if key in paths and Path(paths[key]).is_file():
                mlflow.log_artifact(str(paths[key]), artifact_path="evaluation")
        rows: list[dict[str, Any]] = []
        if "json" in paths and Path(paths["json"]).is_file():
            rows = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))["examples"]
        if rows:
            # Columns as lists: mlflow.log_table renders it as a table in the UI.
            table = {k: [str(r.get(k, "")) for r in rows] for k in rows[0]}
            mlflow.log_table(data=table, artifact_file="evaluation/per_example.json")
        return active.info.run_id
    finally:
        if started:
            mlflow.end_run()
