"""Run the real Determined harness code of a trial here: a stand-in master + the agent's files.

What cannot run on a test machine is the Determined *master* (and the agent that starts the
task container). Everything a trial process runs -- ``det.core.init``, ``DetCallback``, the
launchers, the storage managers -- runs for real against:

- `TrialMaster`: an HTTP server on 127.0.0.1 answering the Determined 0.38.1 REST routes a
  trial's Core API context calls, with the request bodies decoded by Determined's own bindings
  classes (``determined.common.api.bindings``) exactly as the client encodes them. It records
  metrics, progress, checkpoints and preemption acknowledgements, serves the preemption
  long-poll (``pause()`` flips it), and answers any other route with HTTP 501, recording it in
  ``unknown``: a test that ends with ``unknown`` non-empty found a new dependency on the
  master, which must be added here deliberately, not guessed.
- `TrialContainer`: the four files the agent leaves in ``/run/determined/info`` (``cluster``,
  ``trial``, ``rendezvous``, ``resources``) and the ``DET_*`` environment of a task container.
  A test cannot write to ``/run/determined`` (shared by every test running on the machine), so
  the loaders' default paths point at the container's folder instead: in this process with
  `TrialContainer.activate` (the same redirect ``tests/test_det_callback.py`` uses), and in
  child processes through ``tests/det_trial_site/sitecustomize.py`` (put on ``PYTHONPATH`` by
  `TrialContainer.environ`). That is the only stand-in on the trial side: the path the agent's
  bind mount provides.

The end-to-end stand-in (``tests/cluster/``: `det e create`, the agent, the SDK routes) is a
superset of this; these two are the minimum the trial-side tests need.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from determined.common.api import bindings

SITE_DIR = Path(__file__).resolve().parent / "det_trial_site"
USER = "determined"
SESSION_TOKEN = "stand-in-session-token"
# The longest the stand-in holds a preemption long-poll open (a real master: timeout_seconds,
# 60 s). The watcher simply polls again, so a short hold only costs a few idle requests.
LONGPOLL_HOLD_S = 0.5


@dataclass
class TrialMaster:
    """State and records of the stand-in master (see the module docstring)."""

    url: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    run_prepares: int = 0
    unknown: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # When set, pause the trial once a training report reaches this step, or its progress
    # report this fraction (DetCallback reports progress at every 1%, metrics per logging_steps).
    pause_at_step: int | None = None
    pause_at_progress: float | None = None
    _preempt: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pause(self) -> None:
        """What ``det e pause`` makes the master do: signal preemption to the allocation."""
        self._preempt.set()

    @property
    def paused(self) -> bool:
        return self._preempt.is_set()

    def reports(self, group: str) -> list[tuple[int, dict[str, Any]]]:
        """(steps_completed, metrics) of every report in ``group``, in arrival order."""
        return [(m["steps"], m["metrics"]) for m in self.metrics if m["group"] == group]

    # -- routes ------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        if method == "POST" and path == "/api/v1/runs/start":
            bindings.v1RunPrepareForReportingRequest.from_json(body)
            with self._lock:
                self.run_prepares += 1
            return {}
        if method == "GET" and re.fullmatch(r"/api/v1/allocations/[^/]+/signals/preemption", path):
            timeout = float(query.get("timeout_seconds", ["0"])[0])
            self._preempt.wait(min(timeout, LONGPOLL_HOLD_S))
            return {"preempt": self._preempt.is_set()}
        ack = re.fullmatch(r"/api/v1/allocations/([^/]+)/signals/ack_preemption", path)
        if method == "POST" and ack:
            with self._lock:
                self.acks.append(ack[1])
            return {}
        if method == "POST" and re.fullmatch(r"/api/v1/trials/(\d+)/metrics", path):
            req = bindings.v1ReportTrialMetricsRequest.from_json(body)
            report = {
                "group": req.group,
                "trial_id": req.metrics.trialId,
                "steps": req.metrics.stepsCompleted,
                "metrics": dict(req.metrics.metrics.avgMetrics or {}),
            }
            with self._lock:
                self.metrics.append(report)
            if (
                self.pause_at_step is not None
                and req.group == "training"
                and (req.metrics.stepsCompleted or 0) >= self.pause_at_step
            ):
                self.pause()
            return {}
        if method == "POST" and re.fullmatch(r"/api/v1/trials/(\d+)/progress", path):
            # TrainContext.report_progress posts {"progress", "is_raw"} itself (no bindings).
            progress = float(body["progress"])
            with self._lock:
                self.progress.append(progress)
            if self.pause_at_progress is not None and progress >= self.pause_at_progress:
                self.pause()
            return {}
        if method == "POST" and path == "/api/v1/checkpoints":
            ckpt = bindings.v1Checkpoint.from_json(body)
            with self._lock:
                self.checkpoints.append(ckpt.to_json())
            return {}
        raise NoRoute(f"{method} {path}")


class NoRoute(Exception):
    """A route this stand-in does not implement (answered 501, recorded in ``unknown``)."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _dispatch(self, method: str) -> None:
        master = self.server.master
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, payload = 200, {}
        try:
            # A task authenticates with its allocation's session token (api.TaskSession).
            if self.headers.get("Grpc-Metadata-x-allocation-token") != f"Bearer {SESSION_TOKEN}":
                status, payload = 401, {"code": 16, "message": "invalid credentials"}
            else:
                body = json.loads(raw) if raw else None
                payload = master.handle(method, url.path, parse_qs(url.query), body)
        except NoRoute as e:
            master.unknown.append(str(e))
            status, payload = 501, {"code": 12, "message": f"stand-in master: no route {e}"}
        except Exception as e:  # a bug in the stand-in must fail the test, not hang the trial
            master.errors.append(f"{self.command} {url.path}: {e!r}")
            status, payload = 500, {"code": 13, "message": f"stand-in master bug: {e!r}"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    master: TrialMaster


class running_master:  # noqa: N801 - used as a context manager, like open()
    """``with running_master() as master:`` -- serve a `TrialMaster` on 127.0.0.1."""

    def __init__(self, master: TrialMaster | None = None) -> None:
        self.master = master or TrialMaster()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.master = self.master
        self.master.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> TrialMaster:
        self._thread.start()
        return self.master

    def __exit__(self, *exc: Any) -> None:
        self.master.pause()  # release any long-poll still held
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass
class TrialContainer:
    """The agent's side of one trial container (see the module docstring)."""

    root: Path
    config: dict[str, Any]
    hparams: dict[str, Any]
    master_url: str
    trial_id: int = 1
    experiment_id: int = 1
    slots: int = 1
    latest_checkpoint: str | None = None
    steps_completed: int = 0
    trial_run_id: int = 1
    # Unique per container: the launchers name machine-wide things after the allocation
    # (/tmp/pid_server-<allocation id>), and other tests may run trials at the same time.
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def info_dir(self) -> Path:
        return self.root / "run" / "determined" / "info"

    @property
    def task_id(self) -> str:
        return f"{self.experiment_id}.{self.token}"

    @property
    def allocation_id(self) -> str:
        return f"{self.task_id}.{self.trial_run_id}"

    def write(self) -> TrialContainer:
        """Write the info files as ``determined.exec.prep_container`` does in a container."""
        self.info_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "cluster.json": {
                "master_url": self.master_url,
                "cluster_id": "stand-in-cluster",
                "agent_id": "stand-in-agent",
                "slot_ids": list(range(self.slots)),
                "task_id": self.task_id,
                "allocation_id": self.allocation_id,
                "session_token": SESSION_TOKEN,
                "task_type": "TRIAL",
                "master_cert_name": None,
                "master_cert_file": None,
                "latest_checkpoint": self.latest_checkpoint,
            },
            "trial.json": {
                "trial_id": self.trial_id,
                "experiment_id": self.experiment_id,
                "trial_seed": 1234,
                "hparams": self.hparams,
                "config": self.config,
                "steps_completed": self.steps_completed,
                "trial_run_id": self.trial_run_id,
                "debug": False,
                "inter_node_network_interface": None,
            },
            "rendezvous.json": {
                "container_addrs": ["127.0.0.1"],
                "container_rank": 0,
                "container_slot_counts": [self.slots],
            },
            "resources.json": {"gpu_uuids": []},
        }
        for name, data in files.items():
            (self.info_dir / name).write_text(json.dumps(data))
        return self

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A task container's environment: ``base``, the experiment's
        ``environment.environment_variables``, the master's ``DET_*`` variables, and the info
        file redirect for child processes."""
        env = dict(os.environ if base is None else base)
        for item in (self.config.get("environment") or {}).get("environment_variables") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        env.update(
            {
                "DET_MASTER": self.master_url,
                "DET_USER": USER,
                "DET_SESSION_TOKEN": SESSION_TOKEN,
                "DET_TASK_ID": self.task_id,
                "DET_ALLOCATION_ID": self.allocation_id,
                "DET_TRIAL_ID": str(self.trial_id),
                "DET_EXPERIMENT_ID": str(self.experiment_id),
                "DET_HPARAMS": json.dumps(self.hparams),
                "DET_EXPERIMENT_CONFIG": json.dumps(self.config),
                "TEXT2SQL_TEST_DET_INFO_DIR": str(self.info_dir),
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
            }
        )
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), env.get("PYTHONPATH")) if p)
        return env

    def run(
        self,
        entrypoint: str,
        *,
        cwd: Path,
        extra_env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run the experiment's ``entrypoint`` in ``cwd`` (the container's working directory,
        where the context was unpacked) as ``determined.exec.launch`` does: a shell command
        line, with the container's environment (``base_env``, default this process's, plus
        what `environ` adds)."""
        env = self.environ(base_env)
        # The launchers call `python3`; it must be this interpreter (the task image's).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["C10D_PORT"] = str(free_port())  # torchrun's rendezvous, per trial
        env.update(extra_env or {})
        return subprocess.run(
            ["bash", "-c", entrypoint],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def activate(self, monkeypatch: Any) -> Any:
        """Make this process a task of this container; returns ``det.get_cluster_info()``."""
        import determined as det
        from determined import _info

        for cls, name in (
            (_info.ClusterInfo, "cluster.json"),
            (_info.TrialInfo, "trial.json"),
            (_info.RendezvousInfo, "rendezvous.json"),
            (_info.ResourcesInfo, "resources.json"),
        ):
            path = str(self.info_dir / name)
            monkeypatch.setattr(cls._from_file.__func__, "__defaults__", (path,))
        monkeypatch.setattr(_info, "_info", "unloaded")
        for key in ("DET_MASTER", "DET_USER", "DET_SESSION_TOKEN"):
            monkeypatch.setenv(key, self.environ({})[key])
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        info = det.get_cluster_info()
        assert info is not None and info.task_type == "TRIAL"
        return info


def unpack_context(context_dir: Path, workdir: Path) -> list[str]:
    """What a trial's working directory holds: the files ``det e create <yaml> <context_dir>``
    uploads (the ``det`` CLI's own `read_v1_context`, honouring .detignore), unpacked as the
    container unpacks them. Returns the paths."""
    import base64
    import contextlib
    import io
    import tarfile

    from determined.common import context

    with contextlib.redirect_stdout(io.StringIO()):  # its "Preparing files..." progress line
        files = context.read_v1_context(context_dir)
    for f in files:
        target = workdir / f.path
        if f.type == ord(tarfile.DIRTYPE):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(f.content))
            target.chmod(f.mode & 0o777)
    return [f.path for f in files]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def iter_files(root: Path) -> Iterator[tuple[str, int]]:
    """(relative path, size) of every file under ``root``, as checkpoint resources name them."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix(), path.stat().st_size
