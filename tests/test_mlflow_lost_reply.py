"""A create whose reply is lost must not make a second experiment, run or model version (slow).

Real ``mlflow server`` on 127.0.0.1 (tests/test_mlflow_server.py's `MlflowServer`), reached
through `LossyProxy`: an HTTP relay that forwards every request to the server but, for the first
request to each route in ``drop``, reads the server's full answer and closes the client's
connection without sending it. The server has made the thing; the client saw the connection
die. MLflow's own HTTP client would send the POST again (``urllib3.Retry(allowed_methods=None)``)
and ``with_retries`` would too: two runs or versions for one checkpoint. `cluster.mirror` now
sends each create once and, before retrying, looks for it by its deterministic name or tag.

Run: ``HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_mlflow_lost_reply.py``
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.test_mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

RUNS_CREATE = "/api/2.0/mlflow/runs/create"
EXPERIMENTS_CREATE = "/api/2.0/mlflow/experiments/create"
VERSIONS_CREATE = "/api/2.0/mlflow/model-versions/create"


class LossyProxy:
    """Relay to ``upstream``; drop the reply to the first request of each path in ``drop``."""

    def __init__(self, upstream: str, drop: set[str]) -> None:
        self.upstream = urlsplit(upstream)
        self.pending = set(drop)
        self.dropped: list[str] = []
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urlsplit(self.path).path
                proxy.seen.append((self.command, path))
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()  # the server has finished the request
                conn.close()
                if path in proxy.pending:
                    proxy.pending.discard(path)
                    proxy.dropped.append(path)
                    self.close_connection = True  # the reply is lost on its way back
                    return
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = relay  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-lost-reply"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def lossy(server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[LossyProxy]:
    proxy = LossyProxy(server.url, {EXPERIMENTS_CREATE, RUNS_CREATE, VERSIONS_CREATE})
    monkeypatch.setenv("TEXT2SQL_MLFLOW_BACKOFF_S", "0.05")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield proxy
    proxy.close()


def test_lost_replies_make_one_experiment_one_run_one_version(
    server: MlflowServer, lossy: LossyProxy, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from cluster.mirror import TAG_UUID, _register, ensure_experiment, ensure_run

    uri = lossy.url
    client = MlflowClient(tracking_uri=uri)
    uuid = "0e6f1d2c-lost-reply-test"

    exp_id = ensure_experiment(client, "lost-replies", uri)
    run = ensure_run(client, exp_id, uuid, "lost-replies-run", uri)
    version = _register(
        client,
        "lost-replies-model",
        f"runs:/{run.info.run_id}/model",
        run.info.run_id,
        uuid,
        0.5,
        uri,
    )

    # Each create's first reply really was lost (and the server had acted on it).
    assert sorted(lossy.dropped) == sorted([EXPERIMENTS_CREATE, RUNS_CREATE, VERSIONS_CREATE])
    direct = MlflowClient(tracking_uri=server.url)
    experiments = [e for e in direct.search_experiments() if e.name == "lost-replies"]
    assert [e.experiment_id for e in experiments] == [exp_id]
    runs = direct.search_runs([exp_id], filter_string=f"tags.`{TAG_UUID}` = '{uuid}'")
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert len(direct.search_runs([exp_id])) == 1
    versions = direct.search_model_versions("name='lost-replies-model'")
    assert [v.version for v in versions] == [version] == ["1"]
    # Each create went to the server once: the retry found what the lost reply had made.
    for path in (EXPERIMENTS_CREATE, RUNS_CREATE, VERSIONS_CREATE):
        assert lossy.seen.count(("POST", path)) == 1, lossy.seen

    # A second mirror of the same checkpoint finds the same run and version.
    assert ensure_run(client, exp_id, uuid, "lost-replies-run", uri).info.run_id == run.info.run_id
    again = _register(
        client,
        "lost-replies-model",
        f"runs:/{run.info.run_id}/model",
        run.info.run_id,
        uuid,
        0.5,
        uri,
    )
    assert again == version


def test_live_training_logger_makes_one_run_when_its_create_reply_is_lost(
    server: MlflowServer, lossy: LossyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from cluster.mlflow_tracking import MlflowLiveLogger, configure_quiet_mlflow_http

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    # Training's 5 s limit would also fail requests on a loaded machine: not what is tested.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    configure_quiet_mlflow_http()  # as run_off_cluster does: one attempt per report
    live = MlflowLiveLogger(lossy.url, "live-lost-reply", run_name="trial-1", tags={"k": "v"})
    live.log({"loss": 2.0}, step=1)  # create_experiment's reply is lost: buffered
    live.log({"loss": 1.5}, step=2)  # the experiment is found; create_run's reply is lost
    assert len(live.buffer) == 2
    assert sorted(lossy.dropped) == sorted([EXPERIMENTS_CREATE, RUNS_CREATE])
    live.log({"loss": 1.2}, step=3)  # finds the run the lost reply made, sends all three
    assert not live.buffer

    direct = MlflowClient(tracking_uri=server.url)
    exp = direct.get_experiment_by_name("live-lost-reply")
    runs = direct.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [live.run_id]
    history = direct.get_metric_history(live.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert lossy.seen.count(("POST", RUNS_CREATE)) == 1
