"""Execution accuracy as a Hugging Face ``evaluate`` metric module.

The same judge as every report of this project (`evaluation.judge.score`: sandboxed,
read-only, time-limited execution; multiset comparison unless gold orders its rows; Spider's
test-suite variants of the database), packaged the way the field's tools expect a metric::

    import evaluate
    from evaluation.execution_accuracy import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)          # this file: offline, from the installed package
    metric.compute(
        predictions=["SELECT count(*) FROM singer"],
        references=["SELECT count(*) FROM singer"],
        db_paths=["spider/database/concert_singer/concert_singer.sqlite"],
    )
    # {'execution_accuracy': 1.0, 'executable_rate': 1.0, 'exact_match': 1.0, ...}

Each prediction is judged against its reference on ``db_paths[i]`` (a SQLite file, as Spider
ships them) or, for schema-only data (sql-create-context), on databases built from
``contexts[i]`` (the ``CREATE TABLE`` statements; `evaluation.synth_db`). Execution accuracy
counts only judgeable examples (the gold query runs): ``n_judgeable`` says how many.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import evaluate

from dataset_utils.records import Example
from evaluation.judge import score

METRIC_PATH = str(Path(__file__).resolve())

_KWARGS = """
Args:
    predictions: predicted SQL, one string per example.
    references: gold SQL, one string per example.
    db_paths: a SQLite file per example (Spider-style data); or
    contexts: the schema (``CREATE TABLE ...;``) per example, for schema-only data.
    timeout_s: per-query time limit in seconds (default 2.0).
Returns:
    execution_accuracy, executable_rate, exact_match, valid_sql (fractions in [0, 1]),
    n, n_judgeable.
"""


class ExecutionAccuracy(evaluate.Metric):  # type: ignore[misc]
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://yale-lily.github.io/spider"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        db_paths: Sequence[str | None] | None = None,
        contexts: Sequence[str] | None = None,
        timeout_s: float = 2.0,
    ) -> dict[str, Any]:
        n = len(references)
        if db_paths is None and contexts is None:
            raise ValueError("execution_accuracy needs db_paths (SQLite files) or contexts")
        for name, values in (("db_paths", db_paths), ("contexts", contexts)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} references")
        examples = [
            Example(
                question="",
                context=(contexts[i] if contexts is not None else "") or "",
                sql=references[i],
                source="evaluate",
                db_path=db_paths[i] if db_paths is not None else None,
            )
            for i in range(n)
        ]
        overall = score(examples, list(predictions), timeout_s=timeout_s).overall
        return {
            "execution_accuracy": overall.exec_accuracy,
            "executable_rate": overall.executable_rate,
            "exact_match": overall.exact_match,
            "valid_sql": overall.valid_sql_rate,
            "n": overall.n,
            "n_judgeable": overall.n_judgeable,
        }
