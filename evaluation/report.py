"""Evaluation reports: JSON, Markdown and a bar chart, optionally logged to MLflow.

`write_report` takes one `EvalResult` per model label ("base", "adapter", ...) scored on the same
examples and writes into ``out_dir``:

- ``report.json``: title, per-model aggregates (overall, per difficulty, per complexity) and
  the per-example rows;
- ``report.md``: a summary table per model and per difficulty, then one row per example
  (question, gold SQL, each model's SQL and whether it was correct);
- ``exec_accuracy.png``: grouped bars of execution accuracy per difficulty, one bar per model
  (matplotlib, Agg backend -- no display needed).

`log_report_to_mlflow` logs the metrics (``{label}_exec_accuracy``,
``{label}_exec_accuracy_{difficulty}``, ...), the PNG and the per-example table to the active
MLflow run, or to a new run when only ``MLFLOW_TRACKING_URI`` is set; otherwise it does nothing.

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

from dataset_utils.records import Example
from evaluation.judge import NO_LABEL, EvalResult, Metrics

DIFFICULTY_ORDER = ("easy", "medium", "hard")
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")


def _ordered_labels(labels: Sequence[str]) -> list[str]:
    known = [d for d in DIFFICULTY_ORDER if d in labels]
    rest = sorted(lbl for lbl in labels if lbl not in DIFFICULTY_ORDER and lbl != NO_LABEL)
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
            "db_id": ex.db_id or "",
        }
        for label, res in results.items():
            j = res.judgements[i]
            row[f"{label}_sql"] = j.pred_sql
            row[f"{label}_correct"] = _verdict(j.exec_correct)
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


def _group_table(results: Mapping[str, EvalResult], attr: str, name: str) -> list[str]:
    labels = _ordered_labels(sorted({k for r in results.values() for k in getattr(r, attr)}))
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


def _plot(results: Mapping[str, EvalResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    labels = _ordered_labels(sorted({k for r in results.values() for k in r.by_difficulty}))
    groups = ["overall", *labels]
    models = list(results)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups)), 3.8))
    for m_i, model in enumerate(models):
        res = results[model]
        values = [100 * res.overall.exec_accuracy] + [
            100 * res.by_difficulty[g].exec_accuracy if g in res.by_difficulty else 0.0
            for g in labels
        ]
        xs = [g_i + (m_i - (len(models) - 1) / 2) * width for g_i in range(len(groups))]
        bars = ax.bar(xs, values, width=width, label=model)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel("execution accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results: dict[str, EvalResult],
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    title: str,
    decoding: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, exec_accuracy.png and per_example.csv into ``out_dir``.

    ``decoding``: the decoding options the predictions were made with
    (`trainer.config.DecodingArgs` as a dict), recorded in the JSON and the Markdown.

    Returns ``{"json": ..., "markdown": ..., "png": ..., "csv": ...}``.
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
    }

    payload = {
        "title": title,
        "decoding": dict(decoding or {}),
        "models": {
            label: {
                "overall": asdict(res.overall),
                "by_difficulty": {k: asdict(v) for k, v in res.by_difficulty.items()},
                "by_complexity": {k: asdict(v) for k, v in res.by_complexity.items()},
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
        "## Per example",
        "",
        "| # | difficulty | question | gold | "
        + " | ".join(f"{m} SQL | {m} correct" for m in results)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(results),
    ]
    for row in rows:
        cells = [
            str(row["index"]),
            row["difficulty"],
            _md_cell(row["question"]),
            f"`{_md_cell(row['gold'])}`",
        ]
        for m in results:
            cells += [f"`{_md_cell(row[f'{m}_sql'])}`", row[f"{m}_correct"]]
        md.append("| " + " | ".join(cells) + " |")
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")

    _plot(results, paths["png"], title)
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
        for key in ("png", "markdown", "json"):
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
