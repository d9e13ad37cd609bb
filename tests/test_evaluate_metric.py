"""Execution accuracy as an `evaluate` metric module (`evaluation/execution_accuracy.py`).

`evaluate.load` reads it offline from the installed package, and it gives the same verdicts as
the judge every report uses (`evaluation.judge.score`) on real Spider dev rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dataset_utils.records import Example
from evaluation.judge import score

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rows(spider_dir: Path, n: int) -> list[dict[str, str]]:
    rows = []
    with open(spider_dir / "dev.jsonl") as f:
        for line in f:
            r = json.loads(line)
            rows.append(r)
            if len(rows) == n:
                break
    return rows


def test_evaluate_load_reads_the_metric_offline_and_agrees_with_the_judge(
    spider_dir: Path, tmp_path: Path
) -> None:
    rows = _rows(spider_dir, 6)
    db = spider_dir / "database"
    db_paths = [str(db / r["db_id"] / f"{r['db_id']}.sqlite") for r in rows]
    golds = [r["query"] for r in rows]
    # Right, right by another spelling, a wrong result, an error, empty output, right.
    preds = [
        golds[0],
        golds[1].lower(),
        "SELECT 1",
        "SELECT no_such_column FROM no_such_table",
        "",
        golds[5],
    ]
    code = (
        "import json, sys, evaluate\n"
        "from evaluation.execution_accuracy import METRIC_PATH\n"
        "m = evaluate.load(METRIC_PATH)\n"
        "args = json.load(sys.stdin)\n"
        "print(json.dumps(m.compute(**args)))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # a fresh cache: nothing was loaded before
        "PYTHONPATH": str(REPO_ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps({"predictions": preds, "references": golds, "db_paths": db_paths}),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    examples = [
        Example(question=r["question"], context="", sql=g, source="spider", db_path=p)
        for r, g, p in zip(rows, golds, db_paths, strict=True)
    ]
    overall = score(examples, preds).overall
    assert got["n"] == 6 and got["n_judgeable"] == overall.n_judgeable == 6
    assert got["execution_accuracy"] == overall.exec_accuracy == 3 / 6
    assert got["executable_rate"] == overall.executable_rate
    assert got["exact_match"] == overall.exact_match
    assert got["valid_sql"] == overall.valid_sql_rate


def test_metric_judges_schema_only_rows_on_built_databases() -> None:
    import evaluate

    from evaluation.execution_accuracy import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)
    ddl = "CREATE TABLE head (age INTEGER, name VARCHAR)"
    gold = "SELECT count(*) FROM head WHERE age > 56"
    out = metric.compute(
        predictions=[gold, "SELECT count(*) FROM head WHERE age < 56"],
        references=[gold, gold],
        contexts=[ddl, ddl],
    )
    assert out["execution_accuracy"] == 0.5 and out["n_judgeable"] == 2
