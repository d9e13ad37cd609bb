"""The MLflow tracking server dies and comes back during training with live logging.

A real ``mlflow server`` (127.0.0.1, SQLite backend) receives the tiny model's metrics as it
trains (``mlflow.log_during_training: true``). After the second step is logged the server is
killed with SIGKILL and a new server is started at once on the same port and store; while it
starts up, training goes on (the logger buffers, one quick attempt per report, a single
warning). Training must finish normally and the run's ``loss`` history must then hold every step
exactly once: nothing lost while the server was down, nothing duplicated by the retries.

(Killing the server while *mirroring* is covered elsewhere.)
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import tiny
from tests.faults.harness import FAST_OVERRIDES, Watched, base_env, text2sql_cmd
from tests.faults.test_kill9 import STEP_LINE
from trainer.run_store import ExperimentDir

pytestmark = pytest.mark.slow

MAX_STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_server(db: Path, artifacts: Path, port: int, cwd: Path) -> Watched:
    mlflow = Path(sys.executable).with_name("mlflow")
    return Watched(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--default-artifact-root",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=base_env(),
        cwd=cwd,
    )


def _wait_healthy(server: Watched, port: int, timeout: float = 600) -> Watched:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{server.text[-3000:]}")
        time.sleep(0.5)
    server.kill9()
    raise TimeoutError(f"mlflow server did not come up:\n{server.text[-3000:]}")


def test_training_survives_a_tracking_server_restart(tmp_path: Path, spider_dir: Path) -> None:
    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml", model, name="mlflow-restart", steps=MAX_STEPS, live=True
    )
    db, artifacts, port = tmp_path / "mlflow.db", tmp_path / "artifacts", _free_port()
    servers = [_spawn_server(db, artifacts, port, tmp_path)]
    try:
        _run_with_a_restart(exp, tmp_path, db, artifacts, port, servers)
    finally:
        for server in servers:
            server.kill9()


def _run_with_a_restart(
    exp: Path, tmp_path: Path, db: Path, artifacts: Path, port: int, servers: list[Watched]
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{port}"
    _wait_healthy(servers[0], port)
    sets = [*FAST_OVERRIDES, f"mlflow.tracking_uri={uri}"]
    run = Watched(
        text2sql_cmd(
            "run",
            str(exp),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-mirror",
            "--no-progress",
            *[a for o in sets for a in ("--set", o)],
        ),
        env=base_env(),
        cwd=tmp_path,
    )
    try:
        assert run.wait_for(lambda s: STEP_LINE.search(s) is not None, 2), run.text[-3000:]
        servers[0].kill9()  # the tracking server dies mid-training...
        killed_at = time.monotonic()
        # ...and is restarted at once on the same port and store; while it starts up (seconds
        # on an idle machine, minutes on a busy one) training goes on and its reports fail.
        servers.append(_spawn_server(db, artifacts, port, tmp_path))
        _wait_healthy(servers[1], port)
        down_for = time.monotonic() - killed_at
        rc = run.wait(timeout=1800)
    finally:
        run.kill9()
    text = run.text
    assert rc == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert f"training finished: {MAX_STEPS} steps" in text
    # One warning when the server went away (not one per step), one note when it came back.
    assert text.count("MLflow logging failed") == 1, text[-4000:]
    assert "MLflow tracking server is reachable again" in text

    trial = ExperimentDir(tmp_path / "runs" / "mlflow-restart").trials()[-1]
    run_id = trial.info()["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    status = client.get_run(run_id).info.status
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)), steps  # complete, no duplicates
    assert status == "FINISHED"
    print(f"\nserver down for {down_for:.1f} s; loss history steps {sorted(steps)}")
