"""Fixtures for the end-to-end tests on the stand-in master (`tests.cluster.master`).

- ``standin``: a `StandInMaster` per test module (its agent has 2 slots), with the real ``det``
  CLI and ``text2sql`` CLI bound to it (`Cluster`). Any request the stand-in answered with 501
  (a route it does not implement) or could not answer fails the test that caused it.
- ``cluster_yaml``: writes a tiny-model experiment (`tests.tiny`) as a cluster user would:
  the model folder and the data folder bind-mounted into the task container at the same paths,
  ``TEXT2SQL_DATA`` pointing at the data (a container never sees ``../shared``).

Task containers need root (mount/network namespaces, as the agent's Docker does); elsewhere
these tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tiny
from tests.cluster.agent import unshare_problem
from tests.cluster.master import StandInMaster
from tests.conftest import REPO_ROOT, SHARED

BIN = Path(sys.executable).parent
# The cluster's task_container_defaults: no internet on these agents, DeepSpeed on CPU, and a
# task image that already has the project's dependencies (startup-hook.sh skips pip).
TASK_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TEXT2SQL_SKIP_INSTALL": "1",
}


@dataclass
class Cluster:
    master: StandInMaster
    home: Path  # the CLI's config dir (token store), away from the user's

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DET_MASTER=self.master.url,
            DET_USER=self.master.username,
            DET_PASS=self.master.password,
            XDG_CONFIG_HOME=str(self.home),
            PYTHONPATH=str(REPO_ROOT),
            HF_HUB_OFFLINE="1",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(extra)
        return env

    def det(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real ``det`` CLI, run as a user runs it."""
        det = BIN / "det"
        cmd = [str(det)] if det.exists() else [sys.executable, "-m", "determined.cli"]
        proc = subprocess.run(
            [*cmd, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
        self.check()
        assert proc.returncode == 0, f"det {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def create(self, config: Path, *extra: str) -> int:
        """``det e create <config> <repo root>``; the new experiment's id."""
        out = self.det("e", "create", str(config), str(REPO_ROOT), *extra).stdout
        m = re.search(r"Created experiment (\d+)", out)
        assert m, out
        return int(m.group(1))

    def text2sql(
        self, *args: str, timeout: float = 1800, **env: str
    ) -> subprocess.CompletedProcess[str]:
        script = BIN / "text2sql"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "trainer.cli"]
        return subprocess.run(
            [*cmd, *args], env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )

    def check(self) -> None:
        """Fail on any route the stand-in did not implement or could not answer."""
        problems = self.master.unimplemented + self.master.problems
        assert not problems, "stand-in master:\n" + "\n".join(problems)

    def wait(self, exp_id: int, timeout: float = 1800, states: set[str] | None = None) -> str:
        states = states or {"COMPLETED", "ERROR", "CANCELED"}
        try:
            return self.master.wait_for_experiment(exp_id, states, timeout)
        except AssertionError:
            print(self.logs(exp_id)[-20000:])
            raise

    def logs(self, exp_id: int) -> str:
        exp = self.master.experiments[exp_id]
        return "".join(self.master.trial_log_text(t) for t in exp.trial_ids)

    def completed(self, exp_id: int, timeout: float = 1800) -> None:
        state = self.wait(exp_id, timeout)
        if state != "COMPLETED":
            print(self.logs(exp_id)[-20000:])
        assert state == "COMPLETED", f"experiment {exp_id} ended {state}"


@pytest.fixture(scope="session")
def containers_supported() -> None:
    problem = unshare_problem()
    if problem is None:
        return
    message = f"the stand-in agent cannot start task containers: {problem}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true, so this is a failure, not a skip")
    pytest.skip(message)


@pytest.fixture(scope="module")
def standin(
    tmp_path_factory: pytest.TempPathFactory, containers_supported: None
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("standin-master")
    with StandInMaster(root / "master", task_environment=TASK_ENVIRONMENT) as master:
        cluster = Cluster(master, root / "cli-config")
        yield cluster
    cluster.check()


@pytest.fixture(scope="session")
def cluster_tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("cluster-models") / "tiny-llama")


@pytest.fixture(scope="session")
def cluster_data(spider_dir: Path, sql_create_context_path: Path) -> Path:
    return SHARED / "data"


@pytest.fixture
def cluster_yaml(
    tmp_path: Path, cluster_tiny_llama: Path, cluster_data: Path
) -> Callable[..., Path]:
    """``cluster_yaml(name, extra={top-level keys}, hparams={nested overrides},
    env=["K=V", ...], **kwargs of tiny.write_experiment)``."""

    def make(
        name: str = "tiny",
        *,
        extra: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        env: list[str] | None = None,
        **kwargs: Any,
    ) -> Path:
        path = tiny.write_experiment(
            tmp_path / f"{name}.yaml", cluster_tiny_llama, name=name, **kwargs
        )
        config = yaml.safe_load(path.read_text())
        _merge(config["hyperparameters"], hparams or {})
        config["bind_mounts"] = [
            {"host_path": str(p), "container_path": str(p), "read_only": True}
            for p in (cluster_tiny_llama, cluster_data)
        ]
        config["environment"] = {
            "environment_variables": [f"TEXT2SQL_DATA={cluster_data}", *(env or [])]
        }
        config.update(extra or {})
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def step_losses(master: StandInMaster, trial_id: int) -> dict[int, float]:
    return {
        m.steps_completed: float(m.avg_metrics["loss"])
        for m in master.trial_metrics(trial_id, "training")
        if "loss" in m.avg_metrics
    }


def stored_files(storage: Path, uuid: str) -> dict[str, int]:
    root = storage / uuid
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
