"""`DeterminedCheckpointSource` driven through the real Determined SDK against a fake master.

The fake master is a `ThreadingHTTPServer` on 127.0.0.1 that implements the REST routes the
SDK (determined 0.38.1) calls, answering with JSON derived from the responses recorded from a real
master in ``../shared/determined/api-fixtures`` (experiment 324 / trial 319 of
``checkpoints.json``: ten checkpoints ranked by ``validation_loss``). It checks the bearer token
like a master does, so authentication goes through the SDK's own login path.

The fake deliberately ignores the ``sortByMetric`` / ``orderBy`` / ``states`` query parameters
(it records them for assertions instead): it returns checkpoints in recorded order and in every
state, so what is tested is the source's own ranking and filtering, not the fake's.
"""

from __future__ import annotations

import copy
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from determined.common.api import salt_and_hash

from cluster.checkpoint_info import CheckpointInfo, CheckpointSource, best_of, verify_checkpoint_dir
from cluster.checkpoint_source import DeterminedCheckpointSource
from dataset_utils.errors import UserError

EXPERIMENT_ID = 324
TRIAL_ID = 319
USER = "alice"
TOKEN = "fake-token-for-tests"
METRIC = "validation_loss"

# From checkpoints.json, by validation_loss.
LOWEST = "1755626d-924f-463d-a8f7-844a751c1825"  # 0.04799, step 937, recorded last
SECOND_LOWEST = "eee1423a-2389-4536-baf0-c99b5b3b2f6c"  # 0.05179, step 700, recorded first
HIGHEST = "2db6eed3-c86e-4720-876d-eae2af9a1aca"  # 0.18799, step 100

_USER_JSON = {"id": 7, "username": USER, "admin": False, "active": True}


class FakeMaster:
    """State and recorded requests of the fake master; tests edit the public attributes."""

    def __init__(self, fixtures: Path) -> None:
        recorded = json.loads((fixtures / "checkpoints.json").read_text())
        self.checkpoints: list[dict[str, Any]] = copy.deepcopy(recorded["checkpoints"])
        experiment = json.loads((fixtures / "experiment.json").read_text())
        experiment["experiment"]["id"] = EXPERIMENT_ID
        experiment["experiment"]["config"] = copy.deepcopy(
            self.checkpoints[0]["training"]["experimentConfig"]
        )
        self.experiment: dict[str, Any] = experiment
        trial = json.loads((fixtures / "trial.json").read_text())
        trial["trial"].update(id=TRIAL_ID, experimentId=EXPERIMENT_ID)
        self.trial: dict[str, Any] = trial
        self.page_size = 4  # the master's page size when the SDK sends no limit
        self.experiment_states: list[str] = []  # served one per GET, the last one repeats
        self.token = TOKEN
        self.passwords: dict[str, str] = {}  # username -> salted hash, for /api/v1/auth/login
        self.proxied_files: dict[str, Path] = {}  # uuid -> directory served as tar.gz
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.login_bodies: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.url = ""

    # -- editing helpers ---------------------------------------------------------------------

    def checkpoint(self, uuid: str) -> dict[str, Any]:
        return next(c for c in self.checkpoints if c["uuid"] == uuid)

    def configs(self) -> Iterator[dict[str, Any]]:
        yield self.experiment["experiment"]["config"]
        for checkpoint in self.checkpoints:
            yield checkpoint["training"]["experimentConfig"]

    def set_smaller_is_better(self, value: bool) -> None:
        for config in self.configs():
            config["searcher"]["smaller_is_better"] = value

    def set_shared_fs(self, host_path: Path) -> None:
        for config in self.configs():
            config["checkpoint_storage"] = {
                "type": "shared_fs",
                "host_path": str(host_path),
                "storage_path": None,
                "propagation": "rprivate",
                "save_experiment_best": 0,
                "save_trial_best": 1,
                "save_trial_latest": 1,
            }

    def queries(self, path: str) -> list[dict[str, list[str]]]:
        return [query for method, p, query in self.requests if method == "GET" and p == path]

    # -- responses ---------------------------------------------------------------------------

    def metric_reports(self, group: str) -> list[dict[str, Any]]:
        reports = []
        ordered = sorted(self.checkpoints, key=lambda c: c["metadata"]["steps_completed"])
        for n, checkpoint in enumerate(ordered):
            training = checkpoint["training"]
            if group == "training":
                metrics = {
                    "avg_metrics": dict(training["trainingMetrics"]["avgMetrics"]),
                    "batch_metrics": training["trainingMetrics"]["batchMetrics"],
                }
                # Trials may report non-numeric values; the history keeps numbers only.
                metrics["avg_metrics"]["lr_schedule"] = "cosine"
            else:
                metrics = {"validation_metrics": training["validationMetrics"]["avgMetrics"]}
            reports.append(
                {
                    "archived": False,
                    "endTime": checkpoint["reportTime"],
                    "group": group,
                    "id": n + 1,
                    "metrics": metrics,
                    "totalBatches": checkpoint["metadata"]["steps_completed"],
                    "trialId": TRIAL_ID,
                    "trialRunId": 1,
                }
            )
        return reports

    def next_experiment(self) -> dict[str, Any]:
        response = copy.deepcopy(self.experiment)
        if self.experiment_states:
            state = self.experiment_states[0]
            if len(self.experiment_states) > 1:
                self.experiment_states.pop(0)
            response["experiment"]["state"] = state
        return response

    def checkpoint_page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        offset = int(query.get("offset", ["0"])[0])
        limit = int(query.get("limit", ["0"])[0]) or self.page_size
        page = self.checkpoints[offset : offset + limit]
        return {
            "checkpoints": page,
            "pagination": {
                "offset": offset,
                "limit": limit,
                "startIndex": offset,
                "endIndex": offset + len(page),
                "total": len(self.checkpoints),
            },
        }


def _tar_gz(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _FakeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, status: int, code: int, message: str) -> None:
        # grpc-gateway's error body, as a real master sends it.
        self._json(status, {"code": code, "message": message, "error": {"error": message}})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        fake.requests.append((method, url.path, query))
        try:
            self._route(fake, method, url.path, query)
        except Exception as e:  # a bug in the fake must fail the test, not hang the SDK
            fake.errors.append(repr(e))
            self._error(500, 13, f"fake master bug: {e!r}")

    def _route(self, fake: FakeMaster, method: str, path: str, query: dict[str, list[str]]) -> None:
        if method == "POST" and path == "/api/v1/auth/login":
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            fake.login_bodies.append(body)
            if fake.passwords.get(body.get("username")) == body.get("password"):
                self._json(200, {"token": fake.token, "user": _USER_JSON})
            else:
                self._error(403, 7, "invalid credentials")
            return
        if self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._error(401, 16, "invalid credentials")
            return
        if method != "GET":
            self._error(404, 5, f"no route {method} {path}")
            return
        if path == "/api/v1/me":
            self._json(200, {"user": _USER_JSON})
        elif m := re.fullmatch(r"/api/v1/experiments/(\d+)", path):
            if int(m[1]) != EXPERIMENT_ID:
                self._error(404, 5, f"experiment not found: {m[1]}")
            else:
                self._json(200, fake.next_experiment())
        elif m := re.fullmatch(r"/api/v1/experiments/(\d+)/checkpoints", path):
            self._json(200, fake.checkpoint_page(query))
        elif m := re.fullmatch(r"/api/v1/checkpoints/([0-9a-f-]+)", path):
            self._json(200, {"checkpoint": fake.checkpoint(m[1])})
        elif path == "/api/v1/trials/metrics/trial_metrics":
            reports = fake.metric_reports(query["group"][0])
            # Streamed as newline-delimited {"result": ...} chunks; two, to exercise the stream.
            half = len(reports) // 2
            lines = [{"result": {"metrics": part}} for part in (reports[:half], reports[half:])]
            body = "".join(json.dumps(line) + "\n" for line in lines).encode()
            self._send(200, body)
        elif m := re.fullmatch(r"/api/v1/trials/(\d+)", path):
            self._json(200, fake.trial)
        elif (m := re.fullmatch(r"/checkpoints/([0-9a-f-]+)", path)) and m[1] in fake.proxied_files:
            self._send(200, _tar_gz(fake.proxied_files[m[1]]), "application/gzip")
        else:
            self._error(404, 5, f"no route {method} {path}")


class _FakeServer(ThreadingHTTPServer):
    fake: FakeMaster


@pytest.fixture
def fake_master(determined_ref_dir: Path) -> Iterator[FakeMaster]:
    fake = FakeMaster(determined_ref_dir / "api-fixtures")
    server = _FakeServer(("127.0.0.1", 0), _Handler)
    server.fake = fake
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not fake.errors, fake.errors


@pytest.fixture
def master(fake_master: FakeMaster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeMaster:
    """The fake master, with the environment the SDK reads pointing at it (and nowhere else)."""
    for var in (
        "DET_MASTER_ADDR",
        "DET_PASS",
        "DET_SESSION_TOKEN",
        "DET_MASTER_CERT_FILE",
        "DET_MASTER_CERT_NAME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("DET_MASTER", fake_master.url)
    # What a Determined task container sets; the SDK uses it when its token store is empty.
    monkeypatch.setenv("DET_USER", USER)
    monkeypatch.setenv("DET_USER_TOKEN", TOKEN)
    # Keep the SDK's token and cert stores away from the real ~/.config/determined.
    monkeypatch.setenv("DET_DEBUG_CONFIG_PATH", str(tmp_path / "det-config"))
    return fake_master


def _make_store(root: Path, checkpoint: dict[str, Any]) -> Path:
    """Lay a checkpoint out as shared_fs storage does: root/<uuid>/<files at recorded sizes>."""
    directory = root / checkpoint["uuid"]
    for name, size in checkpoint["resources"].items():
        path = directory / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(int(size))  # sparse: the 14 MB state_dict.pth costs no disk
    return directory


# -- choosing the best checkpoint -------------------------------------------------------------


@pytest.mark.parametrize(
    ("smaller_is_better", "expected", "order"),
    [(True, LOWEST, "ORDER_BY_ASC"), (False, HIGHEST, "ORDER_BY_DESC")],
)
def test_best_checkpoint_honours_smaller_is_better(
    master: FakeMaster, smaller_is_better: bool, expected: str, order: str
) -> None:
    master.set_smaller_is_better(smaller_is_better)
    source = DeterminedCheckpointSource(EXPERIMENT_ID)

    best = source.best_checkpoint()

    assert best.uuid == expected
    assert best.smaller_is_better is smaller_is_better
    assert best.searcher_metric == METRIC
    assert best.metric_value == pytest.approx(
        master.checkpoint(expected)["training"]["validationMetrics"]["avgMetrics"][METRIC]
    )
    assert (best.experiment_id, best.trial_id, best.state) == (EXPERIMENT_ID, TRIAL_ID, "COMPLETED")
    assert best.steps_completed == master.checkpoint(expected)["metadata"]["steps_completed"]
    assert best.resources["state_dict.pth"] == 14418394  # sizes arrive as strings
    assert best.resources["code/"] == 0
    assert best.hparams["global_batch_size"] == 64
    assert best.experiment_config["searcher"]["metric"] == METRIC
    assert best.metadata["format"] == "pickle"
    assert best.report_time == master.checkpoint(expected)["reportTime"]
    # The SDK asked the master to sort by the searcher metric in the configured direction and
    # to return only COMPLETED checkpoints.
    first_page = master.queries(f"/api/v1/experiments/{EXPERIMENT_ID}/checkpoints")[0]
    assert first_page["sortByMetric"] == [METRIC]
    assert first_page["orderBy"] == [order]
    assert first_page["states"] == ["STATE_COMPLETED"]


def test_best_checkpoint_follows_pagination_to_a_later_page(master: FakeMaster) -> None:
    master.page_size = 3
    best = master.checkpoint(LOWEST)
    master.checkpoints.remove(best)
    master.checkpoints.append(best)  # on the 4th and last page; page 1 holds the runner-up

    chosen = DeterminedCheckpointSource(EXPERIMENT_ID).best_checkpoint()

    assert chosen.uuid == LOWEST
    pages = master.queries(f"/api/v1/experiments/{EXPERIMENT_ID}/checkpoints")
    assert [q["offset"] for q in pages] == [["0"], ["3"], ["6"], ["9"]]


@pytest.mark.parametrize(
    "state", ["STATE_DELETED", "STATE_PARTIALLY_DELETED", "STATE_ACTIVE", "STATE_ERROR"]
)
def test_best_checkpoint_skips_checkpoints_not_completed(master: FakeMaster, state: str) -> None:
    master.checkpoint(LOWEST)["state"] = state

    chosen = DeterminedCheckpointSource(EXPERIMENT_ID).best_checkpoint()

    assert chosen.uuid == SECOND_LOWEST


def test_best_checkpoint_skips_checkpoints_without_a_metric_value(master: FakeMaster) -> None:
    training = master.checkpoint(LOWEST)["training"]
    del training["validationMetrics"]["avgMetrics"][METRIC]
    training["searcherMetric"] = None

    assert DeterminedCheckpointSource(EXPERIMENT_ID).best_checkpoint().uuid == SECOND_LOWEST


def test_no_usable_checkpoint_is_a_user_error(master: FakeMaster) -> None:
    for checkpoint in master.checkpoints:
        checkpoint["state"] = "STATE_DELETED"

    with pytest.raises(UserError, match=r"experiment 324 .* no COMPLETED checkpoint") as info:
        DeterminedCheckpointSource(EXPERIMENT_ID).best_checkpoint()
    assert "validation_loss" in str(info.value)
    assert "state DELETED" in str(info.value)


def test_unknown_experiment_is_a_user_error(master: FakeMaster) -> None:
    with pytest.raises(UserError, match="not found on Determined master"):
        DeterminedCheckpointSource(999).best_checkpoint()


def test_best_of_is_the_same_rule_for_other_sources() -> None:
    def info(
        uuid: str, value: float | None, steps: int, state: str = "COMPLETED"
    ) -> CheckpointInfo:
        return CheckpointInfo(
            uuid=uuid,
            experiment_id=1,
            trial_id=1,
            steps_completed=steps,
            state=state,
            searcher_metric="loss",
            metric_value=value,
            smaller_is_better=True,
        )

    infos = [
        info("a", 0.5, 10),
        info("b", 0.2, 20),
        info("c", 0.2, 30),
        info("d", 0.1, 40, "ERROR"),
    ]
    best = best_of(infos)
    assert best is not None and best.uuid == "c"  # tie on value -> later step
    assert best_of([info("e", None, 1)]) is None


# -- authentication ---------------------------------------------------------------------------


def test_token_from_environment_is_sent_as_bearer(master: FakeMaster) -> None:
    source = DeterminedCheckpointSource(EXPERIMENT_ID)
    assert isinstance(source, CheckpointSource)
    source.best_checkpoint()
    # No login round trip: DET_USER + DET_USER_TOKEN are used as they are.
    assert not master.login_bodies


def test_wrong_token_is_a_user_error_telling_how_to_log_in(
    master: FakeMaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DET_USER_TOKEN", "expired-token")
    with pytest.raises(UserError, match="not authenticated .*`det user login`"):
        DeterminedCheckpointSource(EXPERIMENT_ID).best_checkpoint()


def test_password_from_environment_is_exchanged_for_a_token(
    master: FakeMaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "Corr3ct-Horse-Battery"
    master.passwords[USER] = salt_and_hash(password)
    monkeypatch.delenv("DET_USER_TOKEN")
    monkeypatch.setenv("DET_PASS", password)

    source = DeterminedCheckpointSource(EXPERIMENT_ID)
    tags = source.describe()

    assert [body["username"] for body in master.login_bodies] == [USER]
    # The SDK sends a salted hash, never the password itself, and nothing we expose holds it.
    assert password not in json.dumps(master.login_bodies)
    assert password not in repr(source) and password not in json.dumps(tags)


# -- describe, metric history, waiting ----------------------------------------------------------


def test_describe_links_back_to_master_experiment_trial_and_checkpoint(master: FakeMaster) -> None:
    assert DeterminedCheckpointSource(EXPERIMENT_ID).describe() == {
        "determined.master": master.url,
        "determined.experiment_id": "324",
        "determined.trial_id": "319",
        "determined.checkpoint_uuid": LOWEST,
    }


def test_metric_history_returns_steps_per_group(master: FakeMaster) -> None:
    source = DeterminedCheckpointSource(EXPERIMENT_ID)

    history = source.metric_history(source.best_checkpoint())

    steps = [100, 200, 300, 400, 500, 600, 700, 800, 900, 937]
    assert set(history) == {"training", "validation"}
    assert [step for step, _ in history["training"]] == steps
    assert [step for step, _ in history["validation"]] == steps
    last_step, last_validation = history["validation"][-1]
    assert last_validation[METRIC] == pytest.approx(0.0479908221967409)
    assert set(last_validation) == {"accuracy", METRIC}
    assert set(history["training"][0][1]) == {"loss"}  # the string-valued metric is dropped
    queries = master.queries("/api/v1/trials/metrics/trial_metrics")
    assert [(q["group"], q["trialIds"]) for q in queries] == [
        (["training"], ["319"]),
        (["validation"], ["319"]),
    ]


def test_wait_until_done_returns_when_completed(master: FakeMaster) -> None:
    master.experiment_states = ["STATE_ACTIVE", "STATE_RUNNING", "STATE_COMPLETED"]

    DeterminedCheckpointSource(EXPERIMENT_ID).wait_until_done(poll_s=0.01, timeout_s=10)

    assert len(master.queries(f"/api/v1/experiments/{EXPERIMENT_ID}")) == 3


@pytest.mark.parametrize("final", ["STATE_ERROR", "STATE_CANCELED"])
def test_wait_until_done_raises_when_the_experiment_fails(master: FakeMaster, final: str) -> None:
    master.experiment_states = ["STATE_RUNNING", final]

    with pytest.raises(UserError, match=f"experiment 324 .* ended in state {final}"):
        DeterminedCheckpointSource(EXPERIMENT_ID).wait_until_done(poll_s=0.01, timeout_s=10)


def test_wait_until_done_times_out(master: FakeMaster) -> None:
    master.experiment_states = ["STATE_RUNNING"]

    with pytest.raises(UserError, match="still STATE_RUNNING after 0.05 s"):
        DeterminedCheckpointSource(EXPERIMENT_ID).wait_until_done(poll_s=0.01, timeout_s=0.05)


# -- download + verification ------------------------------------------------------------------


def test_download_from_shared_fs_is_verified(master: FakeMaster, tmp_path: Path) -> None:
    store = tmp_path / "checkpoints"
    master.set_shared_fs(store)
    _make_store(store, master.checkpoint(LOWEST))
    source = DeterminedCheckpointSource(EXPERIMENT_ID)
    info = source.best_checkpoint()

    out = source.download(info, tmp_path / "out")

    assert out == tmp_path / "out"
    for name, size in info.resources.items():
        if not name.endswith("/"):
            assert (out / name).stat().st_size == size


def test_download_with_include_fetches_only_the_selected_files(
    master: FakeMaster, tmp_path: Path
) -> None:
    store = tmp_path / "checkpoints"
    master.set_shared_fs(store)
    _make_store(store, master.checkpoint(LOWEST))
    source = DeterminedCheckpointSource(EXPERIMENT_ID, include=["*.pth", "metadata.json"])

    out = source.download(source.best_checkpoint(), tmp_path / "out")

    assert sorted(p.name for p in out.rglob("*")) == ["metadata.json", "state_dict.pth"]


def test_download_refuses_a_truncated_file_in_storage(master: FakeMaster, tmp_path: Path) -> None:
    store = tmp_path / "checkpoints"
    master.set_shared_fs(store)
    directory = _make_store(store, master.checkpoint(LOWEST))
    with (directory / "state_dict.pth").open("r+b") as f:
        f.truncate(1000)
    source = DeterminedCheckpointSource(EXPERIMENT_ID)

    with pytest.raises(
        UserError, match=r"state_dict\.pth truncated \(expected 14418394 bytes, found 1000\)"
    ):
        source.download(source.best_checkpoint(), tmp_path / "out")


def test_download_proxies_through_master_when_storage_is_not_mounted(
    master: FakeMaster, tmp_path: Path
) -> None:
    master.set_shared_fs(tmp_path / "not-mounted-here")
    master.proxied_files[LOWEST] = _make_store(tmp_path / "elsewhere", master.checkpoint(LOWEST))
    source = DeterminedCheckpointSource(EXPERIMENT_ID)

    out = source.download(source.best_checkpoint(), tmp_path / "out")

    assert (out / "state_dict.pth").stat().st_size == 14418394
    assert master.queries(f"/checkpoints/{LOWEST}")


def test_download_with_include_falls_back_to_master_when_storage_is_not_mounted(
    master: FakeMaster, tmp_path: Path
) -> None:
    master.set_shared_fs(tmp_path / "not-mounted-here")
    master.proxied_files[LOWEST] = _make_store(tmp_path / "elsewhere", master.checkpoint(LOWEST))
    source = DeterminedCheckpointSource(EXPERIMENT_ID, include=["*.pth"])

    out = source.download(source.best_checkpoint(), tmp_path / "out")

    # The master only proxies whole checkpoints; the selected file is still verified.
    assert (out / "state_dict.pth").stat().st_size == 14418394
    assert master.queries(f"/checkpoints/{LOWEST}")


def test_download_refuses_a_non_empty_destination(master: FakeMaster, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metadata.json").write_text("{}")
    source = DeterminedCheckpointSource(EXPERIMENT_ID)

    with pytest.raises(UserError, match="not an empty directory"):
        source.download(source.best_checkpoint(), tmp_path / "out")


def test_download_refuses_a_checkpoint_deleted_since_listing(
    master: FakeMaster, tmp_path: Path
) -> None:
    source = DeterminedCheckpointSource(EXPERIMENT_ID)
    info = source.best_checkpoint()
    master.checkpoint(LOWEST)["state"] = "STATE_DELETED"

    with pytest.raises(UserError, match="now in state DELETED"):
        source.download(info, tmp_path / "out")


def test_verify_accepts_matching_sizes_and_ignores_directory_entries(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "model_def.py").write_bytes(b"x" * 10)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"y" * 20)

    verify_checkpoint_dir(
        tmp_path, {"code/": 0, "code/model_def.py": 10, "adapter_model.safetensors": 20}
    )


def test_verify_refuses_a_truncated_file(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"y" * 7)

    with pytest.raises(
        UserError, match=r"adapter_model\.safetensors truncated \(expected 20 bytes, found 7\)"
    ):
        verify_checkpoint_dir(tmp_path, {"adapter_model.safetensors": 20})


def test_verify_refuses_a_missing_file_naming_it(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"y" * 20)

    with pytest.raises(
        UserError, match=r"adapter_config\.json is missing \(expected 512 bytes, found none\)"
    ):
        verify_checkpoint_dir(
            tmp_path, {"adapter_model.safetensors": 20, "adapter_config.json": 512}
        )


def test_verify_refuses_paths_outside_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unsafe path"):
        verify_checkpoint_dir(tmp_path, {"../outside.bin": 1})
