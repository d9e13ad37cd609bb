"""MLflow the way its users read it (issue 17): datasets, source, description, evaluation runs.

Against a real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts), started
here: real Spider / sql-create-context splits from the data pipeline, predictions judged by
our execution judge on the real databases, then everything the mirror logs besides the model
itself -- experiment type, run description / source / git / Determined links, the train /
valid / test datasets, a registered version linked to its LoggedModel and one
``mlflow.genai.evaluate`` run per model -- read back through ``MlflowClient`` and compared
with the judge's own verdicts, example by example. Logging everything a second time must not
change one field of a full snapshot of the store.

The tests against the server are ``slow`` (about a minute on 2 quiet cores, most of it the
server's first start and MLflow's GenAI imports); the pieces without a server are fast. The
same flow on a trained tiny model through ``text2sql run`` / ``text2sql mirror`` is in
tests/test_pipeline_e2e.py (SQLite store, fast) and tests/test_mlflow_server.py (server, slow).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import tiny
from tests.test_mlflow_server import MlflowServer, store_snapshot

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "issue17"
MODEL = "issue17-model"
UUID = "0f4c2a9e-1111-4222-8333-944455556666"
N = 6
LINKS = {
    "determined.master": "https://det.example.com:8443",
    "determined.experiment_id": "42",
    "determined.trial_id": "7",
    "determined.checkpoint_uuid": UUID,
}
CONFIG = {"name": EXPERIMENT, "description": "LoRA on Spider + sql-create-context, tiny test"}


# ---- no server: the pieces --------------------------------------------------------------------


def test_split_dataset_names_digest_source_and_size() -> None:
    from cluster.mlflow_lineage import split_dataset

    one_file = {"sources": {"/data/spider/dev.jsonl": 90}, "cache_key": "abc123", "n_test": 9}
    d = split_dataset(one_file, "test", formats=["spider"])
    assert (d.name, d.digest, d.source_type) == ("spider/test", "abc123", "local")
    assert json.loads(d.source) == {"uri": "/data/spider/dev.jsonl"}
    assert json.loads(d.profile) == {"num_rows": 9}
    cols = [c["name"] for c in json.loads(d.schema)["mlflow_colspec"]]
    assert cols[:3] == ["question", "context", "sql"]
    # A prefix of the split (eval.test_samples) is its own dataset.
    part = split_dataset(one_file, "test", formats=["spider"], rows=4)
    assert (part.name, json.loads(part.profile)) == ("spider/test[:4]", {"num_rows": 4})
    assert split_dataset(one_file, "test", rows=20).name == "dev/test"  # no formats: file stem

    hub = {"sources": {"hub:b-mc2/sql-create-context": 80}, "cache_key": "k", "n_train": 64}
    h = split_dataset(hub, "train", formats=["sql-create-context"])
    assert h.source_type == "hugging_face"
    assert json.loads(h.source)["path"] == "b-mc2/sql-create-context"

    both = {"sources": {"/a/dev.jsonl": 120, "hub:b-mc2/x": 80}, "cache_key": "k", "n_valid": 5}
    m = split_dataset(both, "valid", formats=["spider", "sql-create-context"])
    assert m.name == "spider+sql-create-context/valid" and m.source_type == "text2sql"
    assert json.loads(m.source)["sources"] == [
        {"format": "spider", "origin": "/a/dev.jsonl", "rows_loaded": 120},
        {"format": "sql-create-context", "origin": "hub:b-mc2/x", "rows_loaded": 80},
    ]
    with pytest.raises(ValueError, match="unknown split"):
        split_dataset(both, "dev")


def test_git_state_commit_dirty_flag_and_no_credentials(tmp_path: Path) -> None:
    from cluster.mlflow_lineage import git_state, without_credentials

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    git("remote", "add", "origin", "https://someone:ghp_secretToken123@github.com/o/r.git")
    state = git_state(repo / "a.py")
    assert state["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert state["mlflow.source.git.branch"] == "main"
    assert state["text2sql.git.dirty"] == "false"
    assert state["mlflow.source.git.repoURL"] == "https://github.com/o/r.git"
    assert "ghp_secretToken123" not in json.dumps(state)
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo)["text2sql.git.dirty"] == "true"
    assert git_state(tmp_path / "elsewhere") == {}  # not a checkout: no tags, no error
    assert without_credentials("git@github.com:o/r.git") == "git@github.com:o/r.git"


def test_description_and_determined_links() -> None:
    from cluster.mlflow_lineage import checkpoint_lineage_tags, determined_links

    tags = checkpoint_lineage_tags(CONFIG, LINKS, {"git": {}, "experiment_file": None})
    assert tags["determined.experiment_url"] == "https://det.example.com:8443/det/experiments/42"
    assert tags["determined.trial_url"] == "https://det.example.com:8443/det/trials/7"
    assert tags["mlflow.note.content"] == (
        f"{CONFIG['description']}\n\nDetermined: "
        "[experiment 42](https://det.example.com:8443/det/experiments/42) · "
        f"[trial 7](https://det.example.com:8443/det/trials/7) · checkpoint `{UUID}`"
    )
    # Trained on the cluster (no .git there): the mirror's checkout, and it says so.
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] == "Determined experiment 42"
    assert tags["text2sql.git.recorded_at"] == "mirror"
    assert tags["mlflow.source.git.commit"] == _head()
    # Off-cluster: no master URL, no links.
    assert determined_links({"determined.master": "local", "determined.trial_id": "1"}) == {}


# ---- against a server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-tracking"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def judged(spider_dir: Path, sql_create_context_path: Path) -> dict[str, Any]:
    """A real prepared split and two models' predictions, judged by execution."""
    from dataset_utils.pipeline import prepare_data
    from dataset_utils.sources import SourceSpec
    from evaluation.judge import score

    data = prepare_data(
        sources=[
            SourceSpec(format="spider", path=str(spider_dir), limit=60, schema_style="columns"),
            SourceSpec(format="sql-create-context", path=str(sql_create_context_path), limit=30),
        ],
        tokenizer=tiny.tokenizer(),
        chat_format="chatml",
        split={"train": 0.7, "valid": 0.1, "test": 0.2, "seed": 5, "group_by": "sql"},
        max_length=512,
    )
    examples = data.examples["test"][:N]
    assert len(examples) == N
    # Fine-tuned: right on the first three, then a wrong query, a non-query, garbage.
    tuned = [e.sql for e in examples[:3]] + ["SELECT 1", "DROP TABLE x", "SELEC name FRM"]
    base = ["SELECT 1"] + [e.sql for e in examples[1:2]] + ["banana"] * (N - 2)
    results = {"base": score(examples, base), "fine-tuned": score(examples, tuned)}
    assert results["fine-tuned"].overall.n_correct >= 2  # not vacuous
    return {"data": data, "examples": examples, "results": results}


def _log_everything(server: MlflowServer, judged: dict[str, Any]) -> dict[str, Any]:
    """What the mirror logs besides the model (cluster/mirror.py), run twice by the tests."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cluster.mirror import ensure_experiment, find_run
    from cluster.mlflow_eval import log_evaluations
    from cluster.mlflow_lineage import (
        checkpoint_lineage_tags,
        code_provenance,
        dataset_inputs,
        ensure_experiment_kind,
        link_model_version,
        split_dataset,
    )

    uri = server.url
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, EXPERIMENT, uri)
    ensure_experiment_kind(client, exp_id)
    report, formats = judged["data"].report, ["spider", "sql-create-context"]
    run = find_run(client, exp_id, UUID, uri) or client.create_run(
        exp_id, run_name="train", tags={"text2sql.checkpoint_uuid": UUID}
    )
    run_id = run.info.run_id
    provenance = code_provenance(REPO / "experiments" / "smollm2-135m-lora-cpu.yaml")
    for k, v in checkpoint_lineage_tags(CONFIG, LINKS, provenance).items():
        client.set_tag(run_id, k, v)
    client.log_inputs(run_id, datasets=dataset_inputs(report, formats))
    found = client.search_logged_models([exp_id], filter_string="name = 'fine-tuned-0f4c2a9e'")
    model_id = (
        found[0].model_id
        if found
        else mlflow.create_external_model(
            name="fine-tuned-0f4c2a9e", source_run_id=run_id, experiment_id=exp_id
        ).model_id
    )
    versions = client.search_model_versions(f"name='{MODEL}'")
    if not versions:
        client.create_registered_model(MODEL)
        versions = [
            client.create_model_version(
                MODEL, f"models:/{model_id}", run_id=run_id, model_id=model_id
            )
        ]
    link_model_version(client, model_id, MODEL, str(versions[0].version))
    examples = judged["examples"]
    evals = log_evaluations(
        client,
        tracking_uri=uri,
        experiment_id=exp_id,
        training_run_id=run_id,
        uuid=UUID,
        examples=examples,
        results=judged["results"],
        dataset=split_dataset(report, "test", formats=formats, rows=len(examples)),
        model_ids={"fine-tuned": model_id},
        base_name="embedded:smollm2-135m-instruct",
    )
    return {
        "client": client,
        "exp_id": exp_id,
        "run_id": run_id,
        "model_id": model_id,
        "evals": evals,
    }


@pytest.fixture(scope="module")
def logged(server: MlflowServer, judged: dict[str, Any]) -> dict[str, Any]:
    return _log_everything(server, judged)


def _head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.slow
def test_training_run_has_datasets_description_source_and_links(
    logged: dict[str, Any], judged: dict[str, Any]
) -> None:
    client = logged["client"]
    exp = client.get_experiment(logged["exp_id"])
    assert exp.tags["mlflow.experimentKind"] == "genai_development"
    run = client.get_run(logged["run_id"])
    report = judged["data"].report
    got = {
        d.dataset.name: (d.dataset, {t.key: t.value for t in d.tags})
        for d in run.inputs.dataset_inputs
    }
    assert sorted(got) == [f"spider+sql-create-context/{s}" for s in ("test", "train", "valid")]
    for split, context in (("train", "training"), ("valid", "validation"), ("test", "test")):
        ds, tags = got[f"spider+sql-create-context/{split}"]
        assert ds.digest == report["cache_key"]  # the data pipeline's cache key
        assert tags == {"mlflow.data.context": context}
        assert json.loads(ds.profile) == {"num_rows": report[f"n_{split}"]}
        assert ds.source_type == "text2sql"
        assert [s["origin"] for s in json.loads(ds.source)["sources"]] == list(report["sources"])
    tags = run.data.tags
    assert tags["mlflow.note.content"].startswith(CONFIG["description"] + "\n\nDetermined: ")
    assert "(https://det.example.com:8443/det/experiments/42)" in tags["mlflow.note.content"]
    assert tags["determined.trial_url"] == "https://det.example.com:8443/det/trials/7"
    assert tags["mlflow.source.name"] == "experiments/smollm2-135m-lora-cpu.yaml"
    assert tags["mlflow.source.git.commit"] == _head()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["text2sql.git.dirty"] == str(bool(dirty)).lower()


@pytest.mark.slow
def test_evaluation_runs_hold_the_judges_verdicts_per_example(
    logged: dict[str, Any], judged: dict[str, Any]
) -> None:
    from cluster.mlflow_eval import TABLE, find_evaluation_runs, results_table, run_traces

    client, exp_id = logged["client"], logged["exp_id"]
    report = judged["data"].report
    runs = find_evaluation_runs(client, exp_id, UUID)
    assert sorted(runs) == ["base", "fine-tuned"]
    for label, result in judged["results"].items():
        run = client.get_run(runs[label].info.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.runType"] == "genai_evaluate"
        assert run.data.tags["text2sql.training_run_id"] == logged["run_id"]
        assert "mlflow.parentRunId" not in run.data.tags  # listed under "Evaluation runs"
        (ds,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert (ds.name, ds.digest) == (
            f"spider+sql-create-context/test[:{N}]",
            report["cache_key"],
        )
        assert json.loads(ds.profile) == {"num_rows": N}
        model_id = run.data.tags["text2sql.evaluation.model_id"]
        assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
        if label == "fine-tuned":
            assert model_id == logged["model_id"]
        o = result.overall
        m = run.data.metrics
        # MLflow's aggregates of our scorers equal the judge's own figures.
        assert m["execution_accuracy/mean"] == pytest.approx(o.exec_accuracy)
        assert m["exact_match/mean"] == pytest.approx(o.exact_match)
        assert m["executable/mean"] == pytest.approx(o.executable_rate)
        assert m["valid_sql/mean"] == pytest.approx(o.valid_sql_rate)
        assert m["execution_accuracy"] == o.exec_accuracy and m["bleu"] == o.bleu
        assert m["n"] == N

        # Per example: one trace each, with the question, the judged SQL, gold and verdicts.
        traces = run_traces(client, exp_id, run.info.run_id)
        assert len(traces) == N
        by_example = {int(t.info.tags["example"]): t for t in traces}
        assert sorted(by_example) == list(range(N))
        for i, (e, j) in enumerate(zip(judged["examples"], result.judgements, strict=True)):
            t = client.get_trace(by_example[i].info.trace_id)
            assert t.data.spans[0].inputs == {"question": e.question, "context": e.context}
            assert t.data.spans[0].outputs == j.pred_sql
            a = {x.name: x for x in t.info.assessments}
            assert a["expected_response"].value == e.sql
            assert a["execution_accuracy"].value == j.exec_correct
            assert a["exact_match"].value is j.exact_match
            assert a["executable"].value is j.executable
            assert a["valid_sql"].value is j.valid_sql
            if j.exec_correct is False:
                assert a["execution_accuracy"].rationale == (
                    j.error or "different rows from the gold query"
                )

        # The same rows as a table artifact (question, gold, prediction, verdict, error...).
        path = client.download_artifacts(run.info.run_id, TABLE, dst_path=None)
        table = json.loads(Path(path).read_text())
        expected = results_table(judged["examples"], result)
        assert table["columns"] == list(expected)
        assert [list(r) for r in table["data"]] == [
            list(r) for r in zip(*expected.values(), strict=True)
        ]


@pytest.mark.slow
def test_metrics_sit_on_the_models_and_the_registered_version(
    logged: dict[str, Any], judged: dict[str, Any]
) -> None:
    client, exp_id = logged["client"], logged["exp_id"]
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    model_id = version.source.split("/", 1)[1]  # models:/<model_id>
    assert model_id == logged["model_id"]
    model = client.get_logged_model(model_id)
    metrics = {m.key: m for m in model.metrics}
    ft = judged["results"]["fine-tuned"].overall
    assert metrics["execution_accuracy"].value == ft.exec_accuracy
    assert metrics["execution_accuracy/mean"].value == pytest.approx(ft.exec_accuracy)
    assert metrics["execution_accuracy"].dataset_name == f"spider+sql-create-context/test[:{N}]"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [
        {"name": MODEL, "version": int(version.version)}
    ]
    (base,) = client.search_logged_models(
        [exp_id], filter_string="tags.`text2sql.base_model` = 'embedded:smollm2-135m-instruct'"
    )
    assert base.name == "base-smollm2-135m-instruct"
    base_metrics = {m.key: m.value for m in client.get_logged_model(base.model_id).metrics}
    assert base_metrics["execution_accuracy"] == judged["results"]["base"].overall.exec_accuracy


@pytest.mark.slow
def test_logging_everything_again_changes_nothing(
    server: MlflowServer, logged: dict[str, Any], judged: dict[str, Any]
) -> None:
    client, exp_id = logged["client"], logged["exp_id"]
    before = store_snapshot(client, exp_id, MODEL)
    assert len([k for k in before if k.startswith("run ")]) == 3  # training + 2 evaluations
    again = _log_everything(server, judged)
    assert again["run_id"] == logged["run_id"] and again["model_id"] == logged["model_id"]
    assert all(e.reused for e in again["evals"].values())
    assert store_snapshot(client, exp_id, MODEL) == before
