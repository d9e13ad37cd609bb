"""The stand-in master itself (no task containers): loud failure on unimplemented routes,
answers checked against the bindings, authentication, context upload, searcher expansion.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/cluster/test_standin_master.py -q``
"""

from __future__ import annotations

import base64
import io
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from determined.common import api as det_api
from determined.common.api import authentication, bindings, errors

from tests.cluster import api
from tests.cluster.conftest import Cluster
from tests.cluster.master import StandInMaster, complete_config, searcher_trials
from tests.conftest import REPO_ROOT


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Cluster]:
    """A stand-in master with nothing scheduled (experiments are created paused)."""
    with StandInMaster(tmp_path / "master") as master:
        yield Cluster(master, tmp_path / "cli-config")


def _session(master: StandInMaster) -> det_api.Session:
    return authentication.login(master.url, master.username, master.password)


def test_every_route_the_bindings_name_is_in_the_table() -> None:
    names = {r.binding for r in api.ROUTES}
    assert len(api.ROUTES) == len(names) > 200
    found = api.match("GET", "/api/v1/trials/metrics/trial_metrics")
    assert found and found[0].binding == "GetMetrics" and found[0].stream
    found = api.match("POST", "/api/v1/trials/7/metrics")
    assert found and found[0].binding == "ReportTrialMetrics"
    assert found[1] == {"metrics_trialId": "7"}


def test_unimplemented_routes_answer_501_and_are_recorded(bare: Cluster) -> None:
    master = bare.master
    # A route of the API that the stand-in does not implement, through the real CLI.
    result = subprocess.run(
        [*_det(), "model", "list"], env=bare.env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert any("GetModels" in u and "not implemented" in u for u in master.unimplemented)
    # A path that is no route of the 0.38.1 API at all: 501 with the gateway's error body.
    r = requests.get(f"{master.url}/api/v1/no-such-thing", timeout=10)
    assert r.status_code == 501
    assert r.json()["error"]["code"] == 12 and r.json()["error"]["reason"] == "Unimplemented"
    assert any("no-such-thing" in u for u in master.unimplemented)
    # ...and a test that caused either fails.
    with pytest.raises(AssertionError, match="GetModels"):
        bare.check()
    master.unimplemented.clear()


def _det() -> list[str]:
    import sys

    det = Path(sys.executable).parent / "det"
    return [str(det)] if det.exists() else [sys.executable, "-m", "determined.cli"]


def test_answers_are_checked_against_the_bindings(
    bare: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = bare.master
    sess = _session(master)
    assert bindings.get_GetMe(sess).user.username == master.username
    # A stand-in answer missing a required field fails in the stand-in, not in a client.
    monkeypatch.setattr(master, "api_GetMe", lambda **_: {"user": {"username": "x"}})
    with pytest.raises(errors.APIException):
        bindings.get_GetMe(sess)
    assert master.problems and "v1GetMeResponse" in master.problems[0]
    master.problems.clear()


def test_authentication(bare: Cluster) -> None:
    master = bare.master
    with pytest.raises(errors.ForbiddenException):
        authentication.login(master.url, master.username, "wrong")
    anonymous = det_api.UnauthSession(master.url, cert=None, max_retries=0)
    with pytest.raises(errors.UnauthenticatedException):
        bindings.get_GetMe(anonymous)
    # /info needs no login (the CLI reads the master's version from it).
    assert requests.get(f"{master.url}/info", timeout=10).json()["version"] == "0.38.1"


def test_det_e_create_uploads_the_context_minus_detignore(bare: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: ctx\nentrypoint: python -m trainer.finetune\n"
        "searcher: {name: single, metric: eval_loss}\nhyperparameters: {lr: 0.1}\n"
    )
    exp_id = bare.create(config, "--paused")
    exp = bare.master.experiments[exp_id]
    assert exp.state == "PAUSED" and bare.master.trials[exp.trial_ids[0]].state == "PAUSED"
    files = {f["path"] for f in exp.files if int(f["type"]) == ord(tarfile.REGTYPE)}
    for needed in (
        "startup-hook.sh",
        "pyproject.toml",
        "trainer/finetune.py",
        "experiments/ds_configs/zero2.json",
    ):
        assert needed in files
    for path in files:
        assert not path.startswith(("tests/", ".git/", ".venv/", "runs/", "benchmarks/")), path
        assert not path.endswith((".pyc", ".safetensors", ".sqlite")), path
    # The task downloads exactly those files (GetTaskContextDirectory).
    task_id = bare.master.trials[exp.trial_ids[0]].task_id
    answer = bare.master.api_GetTaskContextDirectory(params={"taskId": task_id}, allocation=None)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(answer["b64Tgz"]))) as tar:
        unpacked = {m.name for m in tar.getmembers() if m.isfile()}
        hook = tar.extractfile("startup-hook.sh")
        assert hook is not None and hook.read() == (REPO_ROOT / "startup-hook.sh").read_bytes()
    assert unpacked == files
    # The stored config is the master's: cluster storage merged in, shorthands expanded.
    described = bindings.get_GetExperiment(_session(bare.master), experimentId=exp_id)
    stored: dict[str, Any] = described.experiment.config
    assert stored["checkpoint_storage"]["type"] == "shared_fs"
    assert stored["hyperparameters"]["lr"] == {"type": "const", "val": 0.1}
    assert stored["searcher"]["smaller_is_better"] is True
    bare.check()


def test_master_refuses_what_it_cannot_run(bare: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: x\nentrypoint: python -m trainer.finetune\nresources: {slots_per_trial: 8}\n"
        "searcher: {name: single, metric: eval_loss}\n"
    )
    result = subprocess.run(
        [*_det(), "e", "create", str(config), str(REPO_ROOT)],
        env=bare.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "does not fit the agent's 2 slots" in result.stdout + result.stderr
    assert not bare.master.experiments


def test_searcher_expansion() -> None:
    storage = {"type": "shared_fs", "host_path": "/tmp/x"}
    config = complete_config(
        {
            "searcher": {"name": "grid", "metric": "m"},
            "entrypoint": "x",
            "hyperparameters": {
                "training_args": {
                    "learning_rate": {"type": "categorical", "vals": [0.1, 0.2]},
                    "max_steps": 5,
                },
                "lora": {"r": {"type": "int", "minval": 4, "maxval": 8, "count": 2}},
                "sources": [{"format": "spider"}],
            },
        },
        storage,
        "e",
    )
    trials = searcher_trials(config)
    assert sorted((t["lora"]["r"], t["training_args"]["learning_rate"]) for t in trials) == [
        (4, 0.1),
        (4, 0.2),
        (8, 0.1),
        (8, 0.2),
    ]
    assert all(t["training_args"]["max_steps"] == 5 for t in trials)
    assert all(t["sources"] == [{"format": "spider"}] for t in trials)
    config["searcher"] = {"name": "adaptive_asha", "metric": "m"}
    with pytest.raises(api.ApiError) as e:
        searcher_trials(config)
    assert e.value.status == 501
