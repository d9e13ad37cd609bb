"""Issue 6 acceptance against a real MLflow tracking server on 127.0.0.1 (slow).

What is real here: ``mlflow server`` (SQLite backend, proxied artifact store) started and
stopped by the fixtures, ``text2sql run`` / ``text2sql mirror`` as subprocesses talking to it
over HTTP, the registry, ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and
``mlflow models serve --env-manager local`` answering POST /invocations. Faults are real too:
the server process group is killed while a mirror is in flight, and a checkpoint file is cut
in half on disk.

Run with ``nice -n 15 python -m pytest -m slow tests/test_mlflow_server.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import tiny

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAME = "tiny"  # experiment + registered model name (the tiny YAML's `name`)
MAX_NEW_TOKENS = 12  # tiny YAML's eval.max_new_tokens
SERVE_NEW_TOKENS = 48  # room for a whole query: 12 tokens cut most of them mid-clause
STEPS = 20
DESCRIPTION = "Tiny LoRA on Spider + sql-create-context (MLflow server test)"
# Generous: on a loaded 2-core machine one `text2sql run` (train + mirror) took > 15 min.
TIMEOUT_S = float(os.environ.get("TEXT2SQL_SLOW_TIMEOUT_S", "3600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log) if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"process exited ({proc.returncode}) before {url} answered:\n"
                + log.read_text()[-3000:]
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout_s:.0f} s:\n" + log.read_text()[-3000:])


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session, with everything it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    else:
        # The leader exited; children (uvicorn worker, job runner) may still hold the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over one SQLite store; stop/start keep the store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []

    def start(self) -> None:
        log = self.root / f"server-{len(self.starts)}.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        t0 = time.monotonic()
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.db}",
                    "--artifacts-destination",
                    str(self.artifacts),
                ],
                cwd=self.root,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_http(f"{self.url}/health", self.proc, log, timeout_s=TIMEOUT_S / 4)
        self.starts.append(time.monotonic() - t0)

    def kill(self) -> None:
        """A crash, not a shutdown: SIGKILL to the whole process group."""
        if self.proc is not None:
            kill_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def server(workdir: Path, spider_dir: Path) -> Any:
    srv = MlflowServer(workdir / "server")
    srv.root.mkdir()
    srv.start()
    yield srv
    srv.stop()


def cli_env(server: MlflowServer, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": server.url, **extra}
    env.pop("TEXT2SQL_DEBUG", None)
    return env


def text2sql(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "text2sql"), *args],
        env=env,
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


@dataclass
class Trained:
    trial: Path
    out: str
    seconds: float
    model_dir: Path


@pytest.fixture(scope="module")
def trained(workdir: Path, server: MlflowServer) -> Trained:
    """``text2sql run`` of the tiny LoRA experiment, pointed at the server by the env var."""
    model_dir = tiny.make_tiny_model(workdir / "tiny-llama")
    exp = tiny.write_experiment(
        workdir / "exp.yaml",
        model_dir,
        name=NAME,
        steps=STEPS,
        lr=3e-2,
        live=True,
        description=DESCRIPTION,
    )
    t0 = time.monotonic()
    r = text2sql(
        [
            "run",
            str(exp),
            "--runs-dir",
            str(workdir / "runs"),
            "--no-progress",
            "--set",
            "eval.test_samples=20",
        ],
        cli_env(server),
        workdir,
    )
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    trial = workdir / "runs" / NAME / "trial-1"
    return Trained(trial, r.stdout + r.stderr, seconds, model_dir)


def best_checkpoint(trial: Path) -> Path:
    from cluster.local_source import LocalCheckpointSource

    src = LocalCheckpointSource(trial)
    return src.local_path(src.best_checkpoint())


@pytest.fixture(scope="module")
def in_memory(trained: Trained) -> dict[str, Any]:
    """The fine-tuned model loaded straight from the checkpoint, and 20 held-out prompts."""
    from evaluation.checkpoint_eval import test_examples
    from evaluation.generation import generate_sql
    from trainer.checkpoint import load_checkpoint

    loaded = load_checkpoint(best_checkpoint(trained.trial))
    examples = test_examples(loaded, 20)
    if len(examples) < 20:  # top up from the validation split: still never trained on
        examples += test_examples(loaded, 20 - len(examples), split="valid")
    assert len(examples) == 20
    sql = generate_sql(
        loaded.model,
        loaded.tokenizer,
        examples,
        loaded.plan,
        batch_size=loaded.hp.eval.batch_size,
        max_new_tokens=MAX_NEW_TOKENS,
        progress=False,
    ).sql
    return {"loaded": loaded, "examples": examples, "sql": sql}


def test_run_mirrors_into_the_server(trained: Trained, server: MlflowServer) -> None:
    from mlflow.tracking import MlflowClient

    print(
        f"server up in {server.starts[0]:.0f} s; "
        f"text2sql run (train + mirror) {trained.seconds:.0f} s"
    )
    info = json.loads((trained.trial / "trial.json").read_text())
    assert info["mlflow_tracking_uri"] == server.url
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(NAME)
    assert exp is not None
    runs = training_runs(client, exp.experiment_id)
    # One training run: the live one, reused by the mirror (beside the evaluation runs).
    assert [r.info.run_id for r in runs] == [info["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # Params: hyperparameters (flattened) and the experiment config.
    assert run.data.params["method"] == "lora"
    assert run.data.params["training_args.max_steps"] == str(STEPS)
    assert run.data.params["model.name_or_path"] == str(trained.model_dir)
    # Tags linking back to the trial and checkpoint.
    uuid = run.data.tags["text2sql.checkpoint_uuid"]
    assert best_checkpoint(trained.trial).name == uuid
    assert run.data.tags["text2sql.trial_dir"] == str(trained.trial.resolve())
    # Metric history with steps: training loss at every step, validation at the end.
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    for key in ("eval_loss", "eval_execution_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [STEPS]
    # Evaluation vs base and the round-trip check.
    assert "fine-tuned_exec_accuracy" in run.data.metrics
    assert run.data.metrics["roundtrip_identical"] == 1.0
    # A registered version from this run, and the alias on it.
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert versions[0].tags["text2sql.checkpoint_uuid"] == uuid
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert run.data.tags["text2sql.stage.registered"] == "1"


def test_mlflow_views_then_a_second_mirror_changes_nothing(
    workdir: Path, trained: Trained, server: MlflowServer
) -> None:
    """Issue 17: what the MLflow UI shows -- datasets, description, source and git commit on
    the training run; base and fine-tuned evaluation runs with a trace and verdicts per
    example; the judge's metrics on the registered version's model -- and `text2sql mirror`
    run again leaves every one of them as it was."""
    from mlflow.tracking import MlflowClient

    import cluster
    from cluster.mlflow_eval import TABLE, find_evaluation_runs, run_traces

    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(NAME)
    exp_id = exp.experiment_id
    assert exp.tags["mlflow.experimentKind"] == "genai_development"
    (run,) = training_runs(client, exp_id)
    run = client.get_run(run.info.run_id)
    ckpt = best_checkpoint(trained.trial)
    report = json.loads((ckpt / "text2sql.json").read_text())["data_report"]
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(datasets) == [
        f"spider+sql-create-context/{s}" for s in ("test", "train", "valid")
    ]
    for split, context in (("train", "training"), ("valid", "validation"), ("test", "test")):
        d = datasets[f"spider+sql-create-context/{split}"]
        assert d.dataset.digest == report["cache_key"]
        assert json.loads(d.dataset.profile) == {"num_rows": report[f"n_{split}"]}
        assert [(t.key, t.value) for t in d.tags] == [("mlflow.data.context", context)]
    tags = run.data.tags
    assert tags["mlflow.note.content"].startswith(DESCRIPTION)
    assert tags["mlflow.source.name"] == str((workdir / "exp.yaml").resolve())
    head = subprocess.run(
        ["git", "-C", str(Path(cluster.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert tags.get("mlflow.source.git.commit", "") == head

    n = min(20, report["n_test"])  # --set eval.test_samples=20
    evals = find_evaluation_runs(client, exp_id, ckpt.name)
    assert sorted(evals) == ["base", "fine-tuned"]
    for label, ev in evals.items():
        ev = client.get_run(ev.info.run_id)
        assert ev.info.status == "FINISHED"
        (d,) = ev.inputs.dataset_inputs
        assert d.dataset.digest == report["cache_key"]
        assert json.loads(d.dataset.profile) == {"num_rows": n}
        # The same judge as the report's figures on the training run.
        assert ev.data.metrics["execution_accuracy"] == run.data.metrics[f"{label}_exec_accuracy"]
        assert ev.data.metrics["execution_accuracy/mean"] == pytest.approx(
            run.data.metrics[f"{label}_exec_accuracy"]
        )
        traces = run_traces(client, exp_id, ev.info.run_id)
        assert sorted(int(t.info.tags["example"]) for t in traces) == list(range(n))
        for t in traces:
            names = {a.name for a in t.info.assessments}
            assert {"expected_response", "exact_match", "executable", "valid_sql"} <= names
        table = json.loads(Path(client.download_artifacts(ev.info.run_id, TABLE)).read_text())
        assert len(table["data"]) == n
        assert table["columns"][:5] == ["example", "question", "gold", "prediction", "verdict"]
    version = client.get_model_version(NAME, "1")
    model = client.get_logged_model(version.source.split("/", 1)[1])
    on_model = {m.key: m.value for m in model.metrics}
    assert on_model["execution_accuracy"] == run.data.metrics["fine-tuned_exec_accuracy"]
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": 1}]

    before = store_snapshot(client, exp_id, NAME)
    r = text2sql(
        ["mirror", "--trial-dir", str(trained.trial), "--no-progress"], cli_env(server), workdir
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nothing to do" in r.stdout
    assert store_snapshot(client, exp_id, NAME) == before


def test_pyfunc_from_alias_round_trips_20_prompts(
    trained: Trained,
    server: MlflowServer,
    in_memory: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = pd.DataFrame(
        [{"question": e.question, "context": e.context} for e in in_memory["examples"]]
    )
    got = list(model.predict(frame, params={"max_new_tokens": MAX_NEW_TOKENS})["sql"])
    assert len(got) == 20
    assert got == in_memory["sql"]
    # Not vacuous: the model really generates (non-empty, not all the same answer).
    assert all(got) and len(set(got)) > 1


def test_models_serve_answers_invocations(
    workdir: Path, trained: Trained, server: MlflowServer, in_memory: dict[str, Any]
) -> None:
    from evaluation.checkpoint_eval import test_examples
    from evaluation.generation import generate_sql

    loaded = in_memory["loaded"]

    def one_row(example: Any) -> str:
        # A one-row batch, as the server will see it (batch padding can change greedy output).
        return generate_sql(
            loaded.model,
            loaded.tokenizer,
            [example],
            loaded.plan,
            batch_size=1,
            max_new_tokens=SERVE_NEW_TOKENS,
            progress=False,
        ).sql[0]

    # A real question + schema pair whose in-memory SQL parses. A 2-layer model trained for a
    # few dozen steps writes mostly malformed SQL, so look through the held-out prompts first,
    # then the training prompts (what it fits best).
    # If none parses (a few dozen steps of a 2-layer model need not give one), the first that
    # starts with SELECT: what is under test is that the server answers the in-memory SQL.
    example, expected = None, ""
    fallback: tuple[Any, str] | None = None
    candidates = in_memory["examples"] + test_examples(loaded, 40, split="train")
    for e in candidates:
        sql = one_row(e)
        if _parses(sql):
            example, expected = e, sql
            break
        if fallback is None and sql.strip().upper().startswith("SELECT"):
            fallback = (e, sql)
    if example is None and fallback is not None:
        example, expected = fallback
    assert example is not None, "no prediction of the fine-tuned model starts with SELECT"
    port = free_port()
    log = workdir / "serve.log"
    t0 = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{NAME}/1",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
                "-t",
                str(int(TIMEOUT_S)),
            ],
            cwd=workdir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": server.url},
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=TIMEOUT_S / 4)
        up = time.monotonic() - t0
        body = json.dumps(
            {
                "dataframe_records": [{"question": example.question, "context": example.context}],
                "params": {"max_new_tokens": SERVE_NEW_TOKENS},
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=TIMEOUT_S / 4) as r:
            assert r.status == 200
            answer = json.loads(r.read())
    finally:
        kill_group(proc)
    print(f"models serve up in {up:.1f} s")
    predictions = answer["predictions"]
    assert isinstance(predictions, list) and len(predictions) == 1
    got = predictions[0]["sql"]
    assert set(predictions[0]) == {"sql"}  # no execution asked: the SQL only
    assert isinstance(got, str) and got == expected
    assert got.strip().upper().startswith("SELECT")


def _parses(sql: str) -> bool:
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except (SqlglotError, ValueError):  # TokenError too: a tiny model's unclosed quote
        return False
    return tree is not None and tree.find(sqlglot.exp.Select) is not None


def test_truncated_checkpoint_is_refused(
    workdir: Path, trained: Trained, server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    # A copy of the experiment folder, so the real trial stays intact for the other tests.
    copy = workdir / "runs-truncated"
    shutil.copytree(trained.trial.parent, copy / NAME)
    trial = copy / NAME / "trial-1"
    ckpt = best_checkpoint(trial)
    weights = ckpt / "adapter_model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(size // 2)
    client = MlflowClient(tracking_uri=server.url)
    runs_before = _all_runs(client)
    r = text2sql(
        [
            "mirror",
            "--trial-dir",
            str(trial),
            "--name",
            "tiny-truncated",
            "--registered-model-name",
            "tiny-truncated",
            "--no-progress",
        ],
        cli_env(server),
        workdir,
        timeout=TIMEOUT_S,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.stderr
    assert "adapter_model.safetensors" in err[0] and "truncated" in err[0]
    assert f"expected {size} bytes, found {size // 2}" in err[0]
    # Refused before anything was written to MLflow.
    assert _all_runs(client) == runs_before
    assert client.search_model_versions("name='tiny-truncated'") == []


def training_runs(client: Any, experiment_id: str) -> list[Any]:
    """The experiment's runs that are not MLflow evaluation runs (cluster/mlflow_eval.py)."""
    runs = client.search_runs([experiment_id])
    return [r for r in runs if "text2sql.evaluation.model" not in r.data.tags]


def store_snapshot(client: Any, exp_id: str, model_name: str) -> dict[str, Any]:
    """Everything a viewer could see: runs (tags, params, metric histories, inputs, outputs),
    traces with assessments, logged models with metrics, registered versions."""
    from cluster.mlflow_eval import run_traces

    out: dict[str, Any] = {"experiment": client.get_experiment(exp_id).tags}
    runs = client.search_runs([exp_id])
    for r in sorted(runs, key=lambda r: r.info.run_id):
        full = client.get_run(r.info.run_id)
        out[f"run {r.info.run_id}"] = {
            "status": full.info.status,
            "tags": full.data.tags,
            "params": full.data.params,
            "metrics": {
                k: [
                    (m.step, m.value, m.timestamp)
                    for m in client.get_metric_history(r.info.run_id, k)
                ]
                for k in sorted(full.data.metrics)
            },
            "inputs": sorted(
                (d.dataset.name, d.dataset.digest, d.dataset.source, d.dataset.profile)
                for d in full.inputs.dataset_inputs
            ),
            "models_in": sorted(m.model_id for m in full.inputs.model_inputs),
            "models_out": sorted(m.model_id for m in (full.outputs.model_outputs or [])),
            "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id)),
            "traces": sorted(
                (
                    t.info.trace_id,
                    t.info.tags.get("example"),
                    tuple(sorted((a.name, str(a.value)) for a in t.info.assessments)),
                )
                for t in run_traces(client, exp_id, r.info.run_id)
            ),
        }
    for m in client.search_logged_models([exp_id]):
        out[f"model {m.model_id}"] = {
            "name": m.name,
            "tags": m.tags,
            "metrics": sorted((x.key, x.value, x.run_id, x.dataset_name) for x in m.metrics),
        }
    out["versions"] = sorted(
        (v.name, str(v.version), v.source, v.run_id, tuple(sorted(v.tags.items())))
        for v in client.search_model_versions(f"name='{model_name}'")
    )
    out["aliases"] = client.get_registered_model(model_name).aliases
    out["deleted runs"] = len(client.search_runs([exp_id], run_view_type=2))  # DELETED_ONLY
    return out


def _all_runs(client: Any) -> set[str]:
    exps = client.search_experiments()
    return {r.info.run_id for r in client.search_runs([e.experiment_id for e in exps])}


def _stage_reached(db: Path, stage: str) -> bool:
    """Read the server's SQLite store directly (not through the server we are about to kill)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "SELECT t.run_uuid FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE e.name = 'tiny-fault' AND t.key = ?",
            (f"text2sql.stage.{stage}",),
        ).fetchall()
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()
    return bool(rows)


def test_server_down_mid_mirror_then_rerun_completes_once(
    workdir: Path, trained: Trained, server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    args = [
        "mirror",
        "--trial-dir",
        str(trained.trial),
        "--name",
        "tiny-fault",
        "--registered-model-name",
        "tiny-fault",
        "--no-progress",
    ]
    env = cli_env(server, TEXT2SQL_MLFLOW_RETRIES="4", TEXT2SQL_MLFLOW_BACKOFF_S="0.25")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "text2sql"), *args],
        env=env,
        cwd=workdir,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Mid-mirror: the run exists with params, history and the evaluation report; the model is
    # not logged yet. Then the server crashes.
    deadline = time.monotonic() + TIMEOUT_S
    while not _stage_reached(server.db, "evaluation"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "mirror never reached the evaluation stage"
        time.sleep(0.1)
    server.kill()
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=TIMEOUT_S)
    failed_after = time.monotonic() - killed_at
    assert proc.returncode != 0, out + err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "unreachable" in errors[0] and server.url in errors[0], errors[0]
    assert "after 4 attempts" in errors[0]
    # Exponential backoff between the attempts: 0.25, 0.5, 1.0 s.
    for delay in ("0.2", "0.5", "1.0"):
        assert f"retrying in {delay} s" in err, err
    assert not _stage_reached(server.db, "registered")

    # Back up on the same store: the same command finishes the job, reusing the run.
    server.start()
    r = text2sql(args, env, workdir, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name("tiny-fault")
    runs = training_runs(client, exp.experiment_id)
    assert len(runs) == 1
    versions = client.search_model_versions("name='tiny-fault'")
    assert [v.version for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("tiny-fault", "champion").version) == "1"
    run = runs[0]
    assert run.data.tags["text2sql.stage.registered"] == "1"
    assert run.data.metrics["roundtrip_identical"] == 1.0
    # Metric history logged once, not once per attempt.
    # (the run store's "loss" per step and the trainer's final "train_loss" both map here)
    history: list[int] = []
    for line in (trained.trial / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["group"] == "training":
            history += [
                rec["steps_completed"] for k in ("loss", "train_loss") if k in rec["metrics"]
            ]
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in loss) == sorted(history)
    assert len(history) >= STEPS

    # And once more: nothing to do, nothing duplicated.
    again = text2sql(args, env, workdir, timeout=TIMEOUT_S)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(training_runs(client, exp.experiment_id)) == 1
    assert len(client.search_model_versions("name='tiny-fault'")) == 1
    print(
        f"fault: mirror failed {failed_after:.1f} s after the kill; "
        f"server restart {server.starts[-1]:.1f} s; total {time.monotonic() - t0:.1f} s"
    )
