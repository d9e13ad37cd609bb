"""Evaluation reports (evaluation.report): files on disk and MLflow logging."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dataset_utils.hardness import spider_hardness
from dataset_utils.records import Example
from evaluation.judge import EvalResult, GoldCache, score
from evaluation.report import log_report_to_mlflow, report_metrics, write_report

CONTEXT = (
    "CREATE TABLE sales (id INT, region VARCHAR(20), amount INT); "
    "INSERT INTO sales VALUES (1, 'North', 100), (2, 'South', 50), (3, 'North', 20);"
)


def _examples() -> list[Example]:
    rows = [
        ("Total North sales?", "SELECT SUM(amount) FROM sales WHERE region = 'North'", "easy"),
        ("How many sales?", "SELECT COUNT(*) FROM sales", "easy"),
        (
            "Largest sale per region?",
            "SELECT region, MAX(amount) FROM sales GROUP BY region",
            "medium",
        ),
        (
            "Regions | by total",
            "SELECT region FROM sales GROUP BY region ORDER BY SUM(amount)",
            "hard",
        ),
    ]
    # Spider hardness of these gold queries (official rules): easy, easy, medium, medium.
    return [
        Example(
            question=q,
            context=CONTEXT,
            sql=s,
            source="gretel",
            difficulty=d,
            hardness=spider_hardness(s),
        )
        for q, s, d in rows
    ]


@pytest.fixture(scope="module")
def results() -> tuple[list[Example], dict[str, EvalResult]]:
    examples = _examples()
    cache = GoldCache()
    base = score(
        examples,
        ["SELECT 1", "SELECT COUNT(*) FROM sales", "DROP TABLE sales", "SELECT region FROM sales"],
        gold_cache=cache,
    )
    adapter = score(
        examples, [e.sql for e in examples[:3]] + ["SELECT 'x' | 'y'"], gold_cache=cache
    )
    return examples, {"base": base, "adapter": adapter}


def test_write_report_files(tmp_path: Path, results: tuple[list[Example], dict]) -> None:
    examples, res = results
    paths = write_report(res, examples, tmp_path / "out", title="Base vs adapter")
    assert set(paths) >= {"json", "markdown", "png"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(paths["json"].read_text())
    assert data["title"] == "Base vs adapter"
    assert data["models"]["adapter"]["overall"]["n_correct"] == 3
    assert data["models"]["base"]["overall"]["n_correct"] == 1
    assert set(data["models"]["base"]["by_difficulty"]) == {"easy", "medium", "hard"}
    assert data["examples"][1]["base_correct"] == "yes"
    assert data["examples"][2]["base_correct"] == "no"
    assert data["examples"][2]["base_sql"] == "DROP TABLE sales"

    md = paths["markdown"].read_text()
    assert md.startswith("# Base vs adapter")
    assert "| base | 4 | 4 | 25.0% |" in md and "| adapter | 4 | 4 | 75.0% |" in md
    assert "| easy | 2 | 50.0% (1/2) | 100.0% (2/2) |" in md
    assert "Regions \\| by total" in md  # table cells are escaped
    assert md.count("\n| 3 | hard |") == 1

    with pytest.raises(ValueError):
        write_report(res, examples[:2], tmp_path / "bad", title="x")


def test_report_per_hardness_and_errors(
    tmp_path: Path, results: tuple[list[Example], dict]
) -> None:
    examples, res = results
    assert [e.hardness for e in examples] == ["easy", "easy", "medium", "medium"]
    paths = write_report(res, examples, tmp_path / "out", title="t")
    for key in ("hardness_png", "errors_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["models"]["adapter"]["by_hardness"]["medium"]["n_correct"] == 1
    # base: SELECT 1 (wrong result), correct, DROP TABLE (refused), unsorted regions (wrong);
    # adapter: 3 correct, 'x' | 'y' (wrong result).
    assert data["models"]["base"]["categories"] == {
        "correct": 1,
        "no such table": 0,
        "no such column": 0,
        "syntax error": 0,
        "other execution error": 1,
        "timeout": 0,
        "wrong result": 2,
        "empty result": 0,
        "unjudgeable": 0,
    }
    md = paths["markdown"].read_text()
    assert "## Execution accuracy per Spider hardness" in md
    assert "| easy | 2 | 50.0% (1/2) | 100.0% (2/2) |" in md.split("Spider hardness")[1]
    assert "| medium | 2 | 0.0% (0/2) | 50.0% (1/2) |" in md
    assert "| wrong result | 2 (50.0%) | 1 (25.0%) |" in md
    assert "| other execution error | 1 (25.0%) | 0 (0.0%) |" in md
    rows = list(csv.DictReader(paths["csv"].open(encoding="utf-8")))
    assert [r["hardness"] for r in rows] == ["easy", "easy", "medium", "medium"]
    assert [r["base_category"] for r in rows] == [
        "wrong result",
        "correct",
        "other execution error",
        "wrong result",
    ]
    metrics = report_metrics(res)
    assert metrics["adapter_exec_accuracy_hardness_easy"] == pytest.approx(1.0)
    assert metrics["base_exec_accuracy_hardness_medium"] == pytest.approx(0.0)
    assert metrics["base_error_wrong_result"] == pytest.approx(0.5)
    assert metrics["base_error_no_such_table"] == 0.0
    # Without hardness levels: no hardness chart or table.
    plain = [Example(**{**e.to_dict(), "hardness": None}) for e in examples]
    cache = GoldCache()
    res_plain = {"m": score(plain, [e.sql for e in plain], gold_cache=cache)}
    paths = write_report(res_plain, plain, tmp_path / "plain", title="t")
    assert "hardness_png" not in paths
    assert "Spider hardness" not in paths["markdown"].read_text()


def test_mlflow_logging(
    tmp_path: Path, results: tuple[list[Example], dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    examples, res = results
    paths = write_report(res, examples, tmp_path / "out", title="t")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow.active_run() is None
    assert log_report_to_mlflow(paths, res) is None  # nothing configured: no-op

    # The file store is in maintenance mode in MLflow 3; a SQLite backend is the local default.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Artifacts under tmp_path too (the default is ./mlruns in the working directory).
    experiment = mlflow.create_experiment(
        "eval-report-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    try:
        with mlflow.start_run() as run:
            run_id = log_report_to_mlflow(paths, res)
        assert run_id == run.info.run_id
        client = mlflow.tracking.MlflowClient()
        metrics = client.get_run(run_id).data.metrics
        assert metrics["adapter_exec_accuracy"] == pytest.approx(0.75)
        assert metrics["base_exec_accuracy"] == pytest.approx(0.25)
        assert metrics["adapter_exec_accuracy_easy"] == pytest.approx(1.0)
        assert metrics["base_exec_accuracy_hard"] == pytest.approx(0.0)
        assert set(report_metrics(res)) == set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
        assert "evaluation/exec_accuracy.png" in artifacts
        assert "evaluation/exec_accuracy_hardness.png" in artifacts
        assert "evaluation/errors.png" in artifacts
        assert "evaluation/per_example.json" in artifacts
        table = json.loads(
            Path(
                client.download_artifacts(
                    run_id, "evaluation/per_example.json", str(tmp_path / "dl")
                )
            ).read_text()
        )
        assert "question" in table["columns"] and len(table["data"]) == len(examples)
    finally:
        mlflow.set_tracking_uri("")
