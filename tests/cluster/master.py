"""A stand-in for a Determined 0.38.1 master and its one agent, for end-to-end tests.

It stands in for the one piece of a cluster that cannot run here (the master binary and the
agent's Docker) and nothing else: the clients are the real ones -- the ``det`` CLI, the
harness (``det.core.init`` and its contexts, `DetCallback`, ``determined.exec.*``), the
launchers (``determined.launch.torch_distributed`` / ``.deepspeed``) and the SDK
(``determined.experimental.client``).

What it does, as the master does:

- REST routes matched against ``determined.common.api.bindings`` (`tests.cluster.api`):
  request bodies parsed, and answers checked, with the bindings' own classes. Any other route
  gets HTTP 501 (gRPC Unimplemented) and is recorded in `StandInMaster.unimplemented`, which
  the fixtures turn into a failed test: a new dependency on the master shows up instead of
  being guessed.
- ``det e create``: the config text and the context files the CLI sends (after ``.detignore``),
  cluster defaults merged in (shared_fs checkpoint storage in a temp dir, ...), the searcher's
  trials created (``single``, ``grid``, ``random``; others are refused with 501).
- Each trial runs in a task container (`tests.cluster.agent`) with the ``DET_*`` environment
  the agent and master give it; the harness downloads its context, writes its info files and
  rendezvouses through this API.
- Metrics, progress, early exits, runner status, checkpoints (linked to the validation of the
  same step, as the master's checkpoint view does), logs; long-poll preemption signals, so
  ``det e pause`` checkpoints and stops a trial and ``det e activate`` resumes it from its
  latest checkpoint (``DET_LATEST_CHECKPOINT``); ``max_restarts``; checkpoint listing (sorted
  by a metric, paginated) and download for the SDK.

Not modelled (a test that needs one of these fails with 501 or an explicit error): templates,
workspaces/projects beyond the default, model registry, multi-container (multi-node)
allocations, checkpoint GC tasks, TensorBoards, notebooks/commands/shells.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import socketserver
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from determined.common import constants
from determined.common.api import authentication, bindings

from tests.cluster import api
from tests.cluster.agent import Container, image_environment

log = logging.getLogger("standin-master")

VERSION = "0.38.1"
CLUSTER_ID = "standin-cluster"
MASTER_ID = "standin-master"
AGENT_ID = "standin-agent"
RESOURCE_POOL = "default"
TERMINAL_TRIAL_STATES = {"COMPLETED", "ERROR", "CANCELED"}
TERMINAL_EXPERIMENT_STATES = {"COMPLETED", "ERROR", "CANCELED"}
SEARCHERS = {"single", "grid", "random"}
DEFAULT_IMAGE = "determinedai/pytorch-ngc-dev:0736b6d"


# ------------------------------------------------------------------------------------------
# Records.


@dataclass
class Experiment:
    id: int
    config: dict[str, Any]
    original_config: str
    files: list[dict[str, Any]]
    username: str
    state: str
    start_time: str
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    end_time: str | None = None
    trial_ids: list[int] = field(default_factory=list)


@dataclass
class Trial:
    id: int
    experiment_id: int
    hparams: dict[str, Any]
    seed: int
    task_id: str
    start_time: str
    state: str = "ACTIVE"
    restarts: int = 0
    run_id: int = 0
    end_time: str | None = None
    progress: float = 0.0
    latest_checkpoint: str | None = None
    allocation: Allocation | None = None
    runner_state: str = ""
    early_exit: str | None = None
    allocations: list[str] = field(default_factory=list)


@dataclass
class Allocation:
    id: str
    task_id: str
    trial_id: int
    resources_id: str
    container_id: str
    token: str
    slots: int
    container: Container | None = None
    preempt: bool = False
    acked_preemption: bool = False
    exit_code: int | None = None
    accelerator_data: dict[str, Any] | None = None
    latest_checkpoint: str | None = None  # DET_LATEST_CHECKPOINT handed to the container


@dataclass
class MetricsReport:
    id: int
    trial_id: int
    trial_run_id: int
    steps_completed: int
    group: str
    avg_metrics: dict[str, Any]
    batch_metrics: list[Any] | None
    end_time: str
    archived: bool = False

    def to_json(self) -> dict[str, Any]:
        """A v1MetricsReport. Its ``metrics`` is the master's stored JSON body, snake_case
        (db/postgres_trial_metrics.go): ``validation_metrics`` for the validation group,
        ``avg_metrics`` + ``batch_metrics`` for every other group."""
        if self.group == "validation":
            body: dict[str, Any] = {"validation_metrics": self.avg_metrics}
        else:
            body = {"avg_metrics": self.avg_metrics, "batch_metrics": self.batch_metrics}
        return {
            "id": self.id,
            "trialId": self.trial_id,
            "trialRunId": self.trial_run_id,
            "totalBatches": self.steps_completed,
            "group": self.group,
            "metrics": body,
            "endTime": self.end_time,
            "archived": self.archived,
        }


@dataclass
class LogLine:
    id: int
    trial_id: int
    timestamp: str
    log: str
    stdtype: str
    container_id: str | None
    rank: int | None
    source: str = "container"


# ------------------------------------------------------------------------------------------
# Experiment config: what the master fills in before it stores a config.


def complete_config(
    config: dict[str, Any], storage: dict[str, Any], name_default: str
) -> dict[str, Any]:
    """The config as the master stores it: cluster checkpoint storage merged in, schema
    defaults applied (cf. the ``config`` of an experiment the master returns, e.g.
    ``api-fixtures/experiment.json``), hyperparameter shorthands expanded to ``{type: const}``.
    """
    c = copy.deepcopy(config)
    c["name"] = c.get("name") or name_default
    for key, default in (
        ("description", None),
        ("labels", []),
        ("data", {}),
        ("debug", False),
        ("bind_mounts", []),
        ("max_restarts", 5),
        ("min_validation_period", {"batches": 0}),
        ("min_checkpoint_period", {"batches": 0}),
        ("perform_initial_validation", False),
        ("records_per_epoch", 0),
        ("scheduling_unit", 100),
        ("checkpoint_policy", "best"),
        ("workspace", ""),
        ("project", ""),
        ("profiling", {"enabled": False, "begin_on_batch": 0, "end_after_batch": None}),
    ):
        if c.get(key) is None:
            c[key] = default
    for mount in c["bind_mounts"]:
        mount.setdefault("read_only", False)
        mount.setdefault("propagation", "rprivate")

    cs = dict(storage)
    user_cs = c.get("checkpoint_storage") or {}
    if user_cs.get("type") not in (None, cs["type"]):
        cs = {}
    cs.update({k: v for k, v in user_cs.items() if v is not None})
    for key, default in (("save_experiment_best", 0), ("save_trial_best", 1)):
        cs.setdefault(key, default)
    cs.setdefault("save_trial_latest", 1)
    if cs.get("type") == "shared_fs":
        cs.setdefault("storage_path", None)
        cs.setdefault("propagation", "rprivate")
    c["checkpoint_storage"] = cs

    env = c.get("environment") or {}
    variables = env.get("environment_variables") or []
    if isinstance(variables, list):
        variables = {"cpu": list(variables), "cuda": list(variables), "rocm": list(variables)}
    env["environment_variables"] = {
        k: list(variables.get(k) or []) for k in ("cpu", "cuda", "rocm")
    }
    image = env.get("image")
    if not isinstance(image, dict):
        image = {"cpu": image, "cuda": image, "rocm": image}
    if "gpu" in image:  # the legacy key
        image.setdefault("cuda", image.pop("gpu"))
    # The 0.38.1 default task image, for whichever flavour is missing.
    env["image"] = {k: image.get(k) or DEFAULT_IMAGE for k in ("cpu", "cuda", "rocm")}
    for key, default in (
        ("force_pull_image", False),
        ("ports", {}),
        ("pod_spec", None),
        ("registry_auth", None),
        ("add_capabilities", []),
        ("drop_capabilities", []),
        ("proxy_ports", []),
    ):
        env.setdefault(key, default)
    c["environment"] = env

    resources = c.get("resources") or {}
    for key, default in (
        ("slots_per_trial", 1),
        ("resource_pool", RESOURCE_POOL),
        ("max_slots", None),
        ("priority", None),
        ("weight", 1),
        ("shm_size", None),
        ("native_parallel", False),
        ("devices", []),
        ("is_single_node", None),
    ):
        if resources.get(key) is None:
            resources[key] = default
    c["resources"] = resources

    searcher = c.get("searcher") or {}
    searcher.setdefault("smaller_is_better", True)
    searcher.setdefault("source_trial_id", None)
    searcher.setdefault("source_checkpoint_uuid", None)
    c["searcher"] = searcher

    reproducibility = c.get("reproducibility") or {}
    if reproducibility.get("experiment_seed") is None:
        reproducibility["experiment_seed"] = int(time.time())
    c["reproducibility"] = reproducibility

    c["hyperparameters"] = {
        k: _expand_hparam(v) for k, v in (c.get("hyperparameters") or {}).items()
    }
    return c


def _expand_hparam(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value:
        return value
    if isinstance(value, dict):
        return {k: _expand_hparam(v) for k, v in value.items()}
    return {"type": "const", "val": value}


def _grid_axis(spec: dict[str, Any]) -> list[Any]:
    kind = spec["type"]
    if kind == "const":
        return [spec["val"]]
    if kind == "categorical":
        return list(spec["vals"])
    count = spec.get("count")
    if count is None:
        raise api.ApiError(400, f"grid search: {kind} hyperparameter needs a count")
    lo, hi = spec["minval"], spec["maxval"]
    if kind == "int":
        if count == 1:
            return [(lo + hi) // 2]
        return sorted({round(lo + (hi - lo) * i / (count - 1)) for i in range(count)})
    points = [lo + (hi - lo) * i / (count - 1) for i in range(count)] if count > 1 else [lo]
    if kind == "double":
        return points
    if kind == "log":
        return [spec["base"] ** p for p in points]
    raise api.ApiError(400, f"unknown hyperparameter type {kind!r}")


def _flatten(hps: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in sorted(hps.items()):
        if isinstance(v, dict) and "type" not in v:
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _sample(spec: dict[str, Any], rng: random.Random) -> Any:
    kind = spec["type"]
    if kind == "const":
        return spec["val"]
    if kind == "categorical":
        return rng.choice(spec["vals"])
    if kind == "int":
        return rng.randint(spec["minval"], spec["maxval"])
    if kind == "double":
        return rng.uniform(spec["minval"], spec["maxval"])
    if kind == "log":
        return spec["base"] ** rng.uniform(spec["minval"], spec["maxval"])
    raise api.ApiError(400, f"unknown hyperparameter type {kind!r}")


def searcher_trials(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The hyperparameters of every trial the searcher creates."""
    name = config["searcher"].get("name")
    flat = _flatten(config["hyperparameters"])
    if name == "single":
        return [_nest({k: _sample(v, random.Random(0)) for k, v in flat.items()})]
    if name == "grid":
        keys = list(flat)
        axes = [_grid_axis(flat[k]) for k in keys]
        return [_nest(dict(zip(keys, combo, strict=True))) for combo in itertools.product(*axes)]
    if name == "random":
        rng = random.Random(config["reproducibility"]["experiment_seed"])
        n = int(config["searcher"].get("max_trials") or 1)
        return [_nest({k: _sample(v, rng) for k, v in flat.items()}) for _ in range(n)]
    raise api.ApiError(
        501, f"the stand-in master does not implement the {name!r} searcher ({sorted(SEARCHERS)})"
    )


def _build_context_tgz(files: list[dict[str, Any]]) -> bytes:
    """The context directory as the master hands it to a task (GetTaskContextDirectory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            info = tarfile.TarInfo(f["path"])
            info.type = bytes([int(f["type"])])
            info.mode = int(f.get("mode") or 0o644) & 0o7777
            info.mtime = int(f.get("mtime") or 0)
            data = base64.b64decode(f.get("content") or "")
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# The master.


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class StandInMaster:
    """Start with `start()` (or as a context manager); `url` is its ``DET_MASTER``.

    Arguments:
        root: a scratch directory (checkpoint storage, containers, sockets).
        slots: the agent's slots; trials are scheduled FIFO when they fit.
        username / password: the one user (what ``det user login`` / ``DET_USER`` +
            ``DET_PASS`` must give).
        task_environment: ``task_container_defaults.environment_variables`` of the cluster.
    """

    def __init__(
        self,
        root: Path,
        *,
        slots: int = 2,
        username: str = "determined",
        password: str = "Stand-in-passw0rd",
        task_environment: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.slots = slots
        self.username = username
        self.password = password
        self._password_hash = authentication.salt_and_hash(password)
        self.task_environment = dict(task_environment or {})
        self.storage_dir = root / "checkpoints"
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.storage = {"type": "shared_fs", "host_path": str(self.storage_dir)}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.experiments: dict[int, Experiment] = {}
        self.trials: dict[int, Trial] = {}
        self.allocations: dict[str, Allocation] = {}
        self.checkpoints: dict[str, dict[str, Any]] = {}
        self.metrics: list[MetricsReport] = []
        self.logs: list[LogLine] = []
        self.progress_reports: list[tuple[int, float]] = []
        self.requests: list[tuple[str, str]] = []  # (binding or path, method) in order
        self.unimplemented: list[str] = []
        self.problems: list[str] = []  # answers that failed their binding's check, crashes
        self._user_tokens: set[str] = set()
        self._ids = itertools.count(1)
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0
        self.socket_path = root / "sock" / "master.sock"
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandInMaster:
        handler = _handler_class(self)
        tcp = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        tcp.daemon_threads = True
        self.port = tcp.server_address[1]
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        unix = _UnixHTTPServer(str(self.socket_path), handler)
        for server in (tcp, unix):
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def close(self) -> None:
        with self.lock:
            self._closed = True
            containers = [a.container for a in self.allocations.values() if a.container]
        for c in containers:
            c.kill()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> StandInMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for tests -----------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                value = predicate()
                problems = list(self.unimplemented) + list(self.problems)
            if problems:
                raise AssertionError("stand-in master: " + "; ".join(problems))
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def wait_for_experiment(self, exp_id: int, states: set[str], timeout: float) -> str:
        def state() -> str | None:
            exp = self.experiments.get(exp_id)
            return exp.state if exp and exp.state in states else None

        return str(self.wait_for(state, timeout, f"experiment {exp_id} to reach {states}"))

    def trial_metrics(self, trial_id: int, group: str) -> list[MetricsReport]:
        with self.lock:
            return [
                m
                for m in self.metrics
                if m.trial_id == trial_id and m.group == group and not m.archived
            ]

    def trial_log_text(self, trial_id: int) -> str:
        with self.lock:
            return "".join(line.log for line in self.logs if line.trial_id == trial_id)

    def experiment_checkpoints(self, exp_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [
                self._checkpoint_json(c)
                for c in self.checkpoints.values()
                if self.trials[c["trial_id"]].experiment_id == exp_id
            ]

    # -- auth ------------------------------------------------------------------------------

    def _authenticate(self, headers: Any) -> tuple[str, Allocation | None]:
        """A task session token comes in ``Grpc-Metadata-x-allocation-token`` (TaskSession),
        a user session token in ``Authorization``, both as ``Bearer <token>``."""
        task = (headers.get("Grpc-Metadata-x-allocation-token") or "").removeprefix("Bearer ")
        user = (headers.get("Authorization") or "").removeprefix("Bearer ")
        with self.lock:
            if task:
                for alloc in self.allocations.values():
                    if task.strip() == alloc.token:
                        return "task", alloc
            elif user.strip() in self._user_tokens:
                return "user", None
        raise api.ApiError(401, "invalid credentials")

    # -- request dispatch ------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: Any, body: bytes
    ) -> tuple[int, Any, bool]:
        """(HTTP status, JSON answer or list of stream results, is_stream)."""
        split = urlsplit(raw_path)
        path = "/" + split.path.lstrip("/")
        query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if (method, path) == ("GET", "/info"):
            # Outside the gRPC gateway (master/internal/core.go: echo GET /info, no auth):
            # aproto.MasterInfo. The CLI compares its version with it.
            with self.lock:
                self.requests.append(("/info", method))
            return 200, self._info(), False
        found = api.match(method, path)
        name = found[0].binding if found else None
        with self.lock:
            self.requests.append((name or path, method))
        if found is None:
            message = (
                f"{method} {path}: no route of the Determined {VERSION} REST API "
                "(determined.common.api.bindings) has this path"
            )
            with self.lock:
                self.unimplemented.append(message)
            raise api.ApiError(501, message)
        route, params = found
        handler = getattr(self, f"api_{route.binding}", None)
        if handler is None:
            message = (
                f"{method} {path} ({route.binding}) is not implemented by the stand-in "
                "master; implement it in tests/cluster/master.py"
            )
            with self.lock:
                self.unimplemented.append(message)
            raise api.ApiError(501, message)
        if route.binding != "Login":
            who, alloc = self._authenticate(headers)
        else:
            who, alloc = "anonymous", None
        request = None
        if method in ("POST", "PUT", "PATCH"):
            request = self._parse_body(route, params, body)
        answer = handler(
            params=params, query=query, body=request, who=who, allocation=alloc, headers=headers
        )
        if route.stream:
            results = list(answer)
            for r in results:
                self._check(route, r)
            return 200, results, True
        answer = {} if answer is None else answer
        self._check(route, answer)
        return 200, answer, False

    def _parse_body(self, route: api.Route, params: dict[str, str], body: bytes) -> Any:
        try:
            obj = json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise api.ApiError(400, f"request body is not JSON: {e}") from None
        if not route.request_type or not hasattr(bindings, route.request_type):
            return obj
        # The gateway fills body fields from the path (e.g. trialId of /trials/{trialId}/...).
        if isinstance(obj, dict):
            for key, value in params.items():
                if "_" not in key and key not in obj:
                    obj[key] = int(value) if value.isdigit() else value
        try:
            return getattr(bindings, route.request_type).from_json(obj)
        except (KeyError, TypeError, ValueError) as e:
            raise api.ApiError(
                400, f"{route.binding}: body is not a valid {route.request_type}: {e!r}"
            ) from None

    def _check(self, route: api.Route, answer: Any) -> None:
        try:
            route.check_response(answer)
        except Exception as e:  # noqa: BLE001 - any failure is a stand-in bug to report
            message = f"{route.binding}: answer is not a valid {route.response_type}: {e!r}"
            with self.lock:
                self.problems.append(message)
            raise api.ApiError(500, message) from None

    # -- users -----------------------------------------------------------------------------

    def _user_json(self) -> dict[str, Any]:
        return {
            "id": 2,
            "username": self.username,
            "admin": True,
            "active": True,
            "displayName": "",
            "agentUserGroup": None,
            "modifiedAt": api.now(),
            "remote": False,
        }

    def api_Login(self, *, body: Any, **_: Any) -> dict[str, Any]:
        if body.username != self.username or (
            (body.password if body.isHashed else authentication.salt_and_hash(body.password))
            != self._password_hash
        ):
            raise api.ApiError(403, "invalid credentials")
        return {"token": self._new_user_token(), "user": self._user_json()}

    def _new_user_token(self) -> str:
        token = secrets.token_hex(16)
        with self.lock:
            self._user_tokens.add(token)
        return token

    def api_GetMe(self, **_: Any) -> dict[str, Any]:
        return {"user": self._user_json()}

    def api_Logout(self, *, headers: Any, **_: Any) -> None:
        token = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        with self.lock:
            self._user_tokens.discard(token)

    def _info(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "master_id": MASTER_ID,
            "cluster_id": CLUSTER_ID,
            "cluster_name": "stand-in",
            "telemetry": {"enabled": False, "segment_key": "", "otel_enabled": False},
            "sso_providers": None,
        }

    def api_GetMaster(self, **_: Any) -> dict[str, Any]:
        return {
            "version": VERSION,
            "masterId": MASTER_ID,
            "clusterId": CLUSTER_ID,
            "clusterName": "stand-in",
            "telemetryEnabled": False,
            "hasCustomLogo": False,
            "strictJobQueueControl": False,
            "product": "PRODUCT_UNSPECIFIED",
            "rbacEnabled": False,
        }

    # -- experiments -----------------------------------------------------------------------

    def api_CreateExperiment(self, *, body: Any, who: str, **_: Any) -> dict[str, Any]:
        if who != "user":
            raise api.ApiError(403, "only users create experiments")
        if body.template or body.parentId or body.projectId not in (None, 1):
            raise api.ApiError(
                501, "the stand-in master creates experiments only from a config, in project 1"
            )
        from ruamel import yaml

        try:
            raw = yaml.YAML(typ="safe", pure=True).load(body.config)
        except yaml.YAMLError as e:
            raise api.ApiError(400, f"invalid experiment config: {e}") from None
        if not isinstance(raw, dict):
            raise api.ApiError(400, "invalid experiment config: not a mapping")
        if raw.get("entrypoint") is None:
            raise api.ApiError(400, "invalid experiment: entrypoint is required")
        files = [f.to_json() for f in (body.modelDefinition or [])]
        size = sum(len(f.get("content") or "") // 4 * 3 for f in files)
        if size > constants.MAX_CONTEXT_SIZE:
            raise api.ApiError(400, f"model definition is too large ({size} bytes)")
        with self.lock:
            exp_id = len(self.experiments) + 1
            config = complete_config(raw, self.storage, f"Experiment {exp_id}")
            pool = config["resources"]["resource_pool"]
            if pool != RESOURCE_POOL:
                raise api.ApiError(400, f"resource pool {pool!r} does not exist")
            slots = int(config["resources"]["slots_per_trial"])
            if slots > self.slots:
                raise api.ApiError(
                    400,
                    f"resources.slots_per_trial={slots} does not fit the agent's "
                    f"{self.slots} slots",
                )
            for mount in config["bind_mounts"]:
                if not Path(mount["host_path"]).exists():
                    raise api.ApiError(400, f"bind mount host_path {mount['host_path']} is missing")
            hparam_sets = searcher_trials(config)
            if body.validateOnly:
                return {"experiment": self._placeholder_experiment(config), "config": config}
            exp = Experiment(
                id=exp_id,
                config=config,
                original_config=body.config,
                files=files,
                username=self.username,
                state="ACTIVE" if body.activate else "PAUSED",
                start_time=api.now(),
            )
            self.experiments[exp_id] = exp
            seeds = random.Random(config["reproducibility"]["experiment_seed"])
            for hp in hparam_sets:
                trial_id = len(self.trials) + 1
                self.trials[trial_id] = Trial(
                    id=trial_id,
                    experiment_id=exp_id,
                    hparams=hp,
                    seed=seeds.randrange(2**31),
                    task_id=f"{exp_id}.{uuid.uuid4()}",
                    start_time=api.now(),
                    state="ACTIVE" if body.activate else "PAUSED",
                )
                exp.trial_ids.append(trial_id)
            self._schedule()
            return {"experiment": self._experiment_json(exp), "config": config}

    def _placeholder_experiment(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": 0,
            "name": config["name"],
            "state": "STATE_UNSPECIFIED",
            "archived": False,
            "config": config,
            "originalConfig": "",
            "jobId": "",
            "numTrials": 0,
            "projectId": 1,
            "projectOwnerId": 1,
            "searcherType": config["searcher"]["name"],
            "startTime": api.now(),
            "username": self.username,
        }

    def _experiment(self, exp_id: Any) -> Experiment:
        exp = self.experiments.get(int(exp_id))
        if exp is None:
            raise api.ApiError(404, f"experiment not found: {exp_id}")
        return exp

    def _experiment_json(self, exp: Experiment) -> dict[str, Any]:
        trials = [self.trials[t] for t in exp.trial_ids]
        progress = sum(1.0 if t.state == "COMPLETED" else t.progress for t in trials) / max(
            1, len(trials)
        )
        searcher = exp.config["searcher"]
        return {
            "id": exp.id,
            "name": exp.config["name"],
            "description": exp.config.get("description") or "",
            "labels": list(exp.config.get("labels") or []),
            "startTime": exp.start_time,
            "endTime": exp.end_time,
            "state": f"STATE_{exp.state}",
            "archived": False,
            "numTrials": len(trials),
            "trialIds": list(exp.trial_ids),
            "displayName": "",
            "userId": 2,
            "username": exp.username,
            "resourcePool": exp.config["resources"]["resource_pool"],
            "searcherType": searcher["name"],
            "searcherMetric": searcher.get("metric"),
            "hyperparameters": exp.config["hyperparameters"],
            "notes": "",
            "jobId": exp.job_id,
            "forkedFrom": None,
            "progress": progress,
            "projectId": 1,
            "projectName": "Uncategorized",
            "workspaceId": 1,
            "workspaceName": "Uncategorized",
            "parentArchived": False,
            "config": exp.config,
            "originalConfig": exp.original_config,
            "projectOwnerId": 1,
            "checkpointCount": sum(
                1 for c in self.checkpoints.values() if c["trial_id"] in exp.trial_ids
            ),
            "unmanaged": False,
        }

    def api_GetExperiment(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["experimentId"])
            return {"experiment": self._experiment_json(exp), "jobSummary": None}

    def api_PauseExperiment(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["id"])
            if exp.state in TERMINAL_EXPERIMENT_STATES:
                raise api.ApiError(
                    409, f"experiment in terminal state {exp.state} cannot be paused"
                )
            exp.state = "PAUSED"
            for trial_id in exp.trial_ids:
                trial = self.trials[trial_id]
                if trial.allocation is not None:
                    trial.allocation.preempt = True
                elif trial.state not in TERMINAL_TRIAL_STATES:
                    trial.state = "PAUSED"
            self.changed.notify_all()
        return {}

    def api_ActivateExperiment(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["id"])
            if exp.state in TERMINAL_EXPERIMENT_STATES:
                raise api.ApiError(
                    409, f"experiment in terminal state {exp.state} cannot be activated"
                )
            exp.state = "ACTIVE"
            for trial_id in exp.trial_ids:
                trial = self.trials[trial_id]
                if trial.state == "PAUSED":
                    trial.state = "ACTIVE"
            self._schedule()
        return {}

    def api_KillExperiment(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["id"])
            if exp.state in TERMINAL_EXPERIMENT_STATES:
                return {}
            exp.state = "STOPPING_CANCELED"
            for trial_id in exp.trial_ids:
                trial = self.trials[trial_id]
                if trial.allocation is not None and trial.allocation.container is not None:
                    trial.allocation.container.kill(grace_s=0)
                elif trial.state not in TERMINAL_TRIAL_STATES:
                    trial.state = "CANCELED"
            self._maybe_finish(exp)
        return {}

    def api_GetExperimentTrials(
        self, *, params: dict[str, str], query: dict[str, list[str]], **_: Any
    ) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["experimentId"])
            trials = [self._trial_json(self.trials[t]) for t in exp.trial_ids]
        page, pagination = _paginate(trials, query)
        return {"trials": page, "pagination": pagination}

    def api_GetExperimentCheckpoints(
        self, *, params: dict[str, str], query: dict[str, list[str]], **_: Any
    ) -> dict[str, Any]:
        with self.lock:
            exp = self._experiment(params["id"])
            checkpoints = [
                self._checkpoint_json(c)
                for c in self.checkpoints.values()
                if c["trial_id"] in exp.trial_ids
            ]
        return _sorted_checkpoints(checkpoints, query)

    # -- trials ----------------------------------------------------------------------------

    def _trial(self, trial_id: Any) -> Trial:
        trial = self.trials.get(int(trial_id))
        if trial is None:
            raise api.ApiError(404, f"trial not found: {trial_id}")
        return trial

    def _validation_at(self, trial_id: int, steps: int) -> MetricsReport | None:
        found = [
            m
            for m in self.metrics
            if m.trial_id == trial_id
            and m.group == "validation"
            and m.steps_completed == steps
            and not m.archived
        ]
        return found[-1] if found else None

    def _trial_json(self, trial: Trial) -> dict[str, Any]:
        exp = self.experiments[trial.experiment_id]
        searcher = exp.config["searcher"]
        metric, smaller = searcher.get("metric"), bool(searcher.get("smaller_is_better", True))
        reports = [m for m in self.metrics if m.trial_id == trial.id and not m.archived]
        validations = [m for m in reports if m.group == "validation"]
        scored = [v for v in validations if _finite(v.avg_metrics.get(metric))]

        def workload(m: MetricsReport) -> dict[str, Any]:
            return {
                "endTime": m.end_time,
                "metrics": {"avgMetrics": m.avg_metrics, "batchMetrics": []},
                "numInputs": 0,
                "totalBatches": m.steps_completed,
            }

        best = (
            sorted(scored, key=lambda v: float(v.avg_metrics[metric]) * (1 if smaller else -1))[0]
            if scored
            else None
        )
        ckpts = [
            self._checkpoint_json(c) for c in self.checkpoints.values() if c["trial_id"] == trial.id
        ]
        best_ckpt = _best_checkpoint(ckpts, metric, smaller)
        return {
            "id": trial.id,
            "experimentId": trial.experiment_id,
            "startTime": trial.start_time,
            "endTime": trial.end_time,
            "state": f"STATE_{trial.state}",
            "restarts": trial.restarts,
            "hparams": trial.hparams,
            "totalBatchesProcessed": max((m.steps_completed for m in reports), default=0),
            "bestValidation": workload(best) if best else None,
            "latestValidation": workload(validations[-1]) if validations else None,
            "bestCheckpoint": (
                {
                    "uuid": best_ckpt["uuid"],
                    "endTime": best_ckpt["reportTime"],
                    "state": best_ckpt["state"],
                    "resources": best_ckpt["resources"],
                    "totalBatches": best_ckpt["metadata"].get("steps_completed", 0),
                    "metadata": best_ckpt["metadata"],
                }
                if best_ckpt
                else None
            ),
            "runnerState": trial.runner_state,
            "taskId": trial.task_id,
            "taskIds": [trial.task_id],
            "searcherMetricValue": float(best.avg_metrics[metric]) if best else None,
            "checkpointCount": len(ckpts),
            "totalCheckpointSize": str(sum(int(v) for c in ckpts for v in c["resources"].values())),
            "wallClockTime": 0.0,
        }

    def api_GetTrial(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            return {"trial": self._trial_json(self._trial(params["trialId"]))}

    def api_GetTrialWorkloads(
        self, *, params: dict[str, str], query: dict[str, list[str]], **_: Any
    ) -> dict[str, Any]:
        """Training, validation and checkpoint workloads by step (``det e describe``)."""
        with self.lock:
            trial = self._trial(params["trialId"])
            workloads: list[tuple[int, int, dict[str, Any]]] = []
            for m in self.metrics:
                if m.trial_id == trial.id and not m.archived:
                    kind = "validation" if m.group == "validation" else "training"
                    workloads.append(
                        (
                            m.steps_completed,
                            1 if kind == "validation" else 0,
                            {
                                kind: {
                                    "endTime": m.end_time,
                                    "metrics": {"avgMetrics": m.avg_metrics, "batchMetrics": []},
                                    "numInputs": 0,
                                    "totalBatches": m.steps_completed,
                                }
                            },
                        )
                    )
            for c in self.checkpoints.values():
                if c["trial_id"] == trial.id:
                    steps = int((c.get("metadata") or {}).get("steps_completed", 0))
                    workloads.append(
                        (
                            steps,
                            2,
                            {
                                "checkpoint": {
                                    "uuid": c["uuid"],
                                    "endTime": c["reportTime"],
                                    "state": c.get("state") or "STATE_COMPLETED",
                                    "resources": dict(c.get("resources") or {}),
                                    "metadata": dict(c.get("metadata") or {}),
                                    "totalBatches": steps,
                                }
                            },
                        )
                    )
        workloads.sort(key=lambda w: (w[0], w[1]))
        page, pagination = _paginate([w[2] for w in workloads], query)
        return {"workloads": page, "pagination": pagination}

    def api_GetTrialCheckpoints(
        self, *, params: dict[str, str], query: dict[str, list[str]], **_: Any
    ) -> dict[str, Any]:
        with self.lock:
            trial = self._trial(params["id"])
            checkpoints = [
                self._checkpoint_json(c)
                for c in self.checkpoints.values()
                if c["trial_id"] == trial.id
            ]
        return _sorted_checkpoints(checkpoints, query)

    def api_ReportTrialMetrics(self, *, params: dict[str, str], body: Any, **_: Any) -> None:
        trial_id = int(params["metrics_trialId"])
        m = body.metrics
        if m.trialId != trial_id:
            raise api.ApiError(400, f"trial id mismatch: {m.trialId} != {trial_id}")
        with self.lock:
            self._trial(trial_id)
            steps = int(m.stepsCompleted or 0)
            # A restarted trial's first report archives what an older run reported for the
            # same or later steps (the master's "metrics are archived on first report").
            for old in self.metrics:
                if (
                    old.trial_id == trial_id
                    and old.group == body.group
                    and old.trial_run_id < m.trialRunId
                    and old.steps_completed >= steps
                ):
                    old.archived = True
            self.metrics.append(
                MetricsReport(
                    id=len(self.metrics) + 1,
                    trial_id=trial_id,
                    trial_run_id=m.trialRunId,
                    steps_completed=steps,
                    group=body.group,
                    avg_metrics=dict(m.metrics.avgMetrics),
                    batch_metrics=m.metrics.batchMetrics,
                    end_time=m.reportTime or api.now(),
                )
            )
        return None

    def api_GetMetrics(self, *, query: dict[str, list[str]], **_: Any) -> Iterator[dict[str, Any]]:
        trial_ids = {int(t) for t in query.get("trialIds", [])}
        group = (query.get("group") or [""])[0]
        with self.lock:
            reports = [
                m.to_json()
                for m in self.metrics
                if m.trial_id in trial_ids and m.group == group and not m.archived
            ]
        yield {"metrics": reports}

    def api_ReportTrialProgress(self, *, body: Any, **_: Any) -> None:
        with self.lock:
            trial = self._trial(body.trialId)
            trial.progress = float(body.progress)
            self.progress_reports.append((trial.id, trial.progress))

    def api_ReportTrialSearcherEarlyExit(
        self, *, params: dict[str, str], body: Any, **_: Any
    ) -> None:
        with self.lock:
            trial = self._trial(params["trialId"])
            reason = body.get("reason") if isinstance(body, dict) else getattr(body, "reason", None)
            trial.early_exit = str(reason)

    def api_PostTrialRunnerMetadata(self, *, params: dict[str, str], body: Any, **_: Any) -> None:
        with self.lock:
            trial = self._trial(params["trialId"])
            state = body.get("state") if isinstance(body, dict) else getattr(body, "state", "")
            trial.runner_state = str(state or "")

    def api_TrialLogs(
        self, *, params: dict[str, str], query: dict[str, list[str]], **_: Any
    ) -> Iterator[dict[str, Any]]:
        trial_id = int(params["trialId"])
        follow = (query.get("follow") or ["false"])[0] == "true"
        sent = 0
        while True:
            with self.lock:
                trial = self._trial(trial_id)
                lines = [line for line in self.logs if line.trial_id == trial_id][sent:]
                done = trial.state in TERMINAL_TRIAL_STATES
            for line in lines:
                sent += 1
                yield {
                    "id": str(line.id),
                    "trialId": line.trial_id,
                    "timestamp": line.timestamp,
                    "message": line.log,
                    "log": line.log,
                    "level": "LOG_LEVEL_INFO",
                    "source": line.source,
                    "stdtype": line.stdtype,
                    "containerId": line.container_id,
                    "agentId": AGENT_ID,
                    "rankId": line.rank,
                }
            if not follow or (done and not lines):
                return
            time.sleep(0.2)

    # -- checkpoints -----------------------------------------------------------------------

    def api_RunPrepareForReporting(self, *, body: Any, **_: Any) -> dict[str, Any]:
        with self.lock:
            self._trial(body.runId)
        return {"storageId": 1}

    def api_ReportCheckpoint(self, *, body: Any, allocation: Allocation | None, **_: Any) -> None:
        if allocation is None:
            raise api.ApiError(403, "checkpoints are reported by tasks")
        ckpt = body.to_json(omit_unset=True)
        with self.lock:
            if ckpt["uuid"] in self.checkpoints:
                raise api.ApiError(409, f"checkpoint {ckpt['uuid']} already exists")
            trial = self.trials[allocation.trial_id]
            ckpt["trial_id"] = trial.id
            ckpt["reportTime"] = ckpt.get("reportTime") or api.now()
            self.checkpoints[ckpt["uuid"]] = ckpt
            trial.latest_checkpoint = ckpt["uuid"]
        return None

    def _checkpoint_json(self, c: dict[str, Any]) -> dict[str, Any]:
        trial = self.trials[c["trial_id"]]
        exp = self.experiments[trial.experiment_id]
        metric = exp.config["searcher"].get("metric")
        steps = int((c.get("metadata") or {}).get("steps_completed", -1))
        validation = self._validation_at(trial.id, steps)
        training_reports = [
            m
            for m in self.metrics
            if m.trial_id == trial.id
            and m.group == "training"
            and m.steps_completed == steps
            and not m.archived
        ]
        training: dict[str, Any] = {
            "trialId": trial.id,
            "experimentId": exp.id,
            "experimentConfig": exp.config,
            "hparams": trial.hparams,
        }
        if training_reports:
            training["trainingMetrics"] = {"avgMetrics": training_reports[-1].avg_metrics}
        if validation is not None:
            training["validationMetrics"] = {"avgMetrics": validation.avg_metrics}
            value = validation.avg_metrics.get(metric)
            if _finite(value):
                training["searcherMetric"] = float(value)
        return {
            "uuid": c["uuid"],
            "taskId": c.get("taskId"),
            "allocationId": c.get("allocationId"),
            "reportTime": c["reportTime"],
            "resources": dict(c.get("resources") or {}),
            "metadata": dict(c.get("metadata") or {}),
            "state": c.get("state") or "STATE_COMPLETED",
            "training": training,
            "storageId": c.get("storageId", 1),
        }

    def api_GetCheckpoint(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        with self.lock:
            c = self.checkpoints.get(params["checkpointUuid"])
            if c is None:
                raise api.ApiError(404, f"checkpoint not found: {params['checkpointUuid']}")
            return {"checkpoint": self._checkpoint_json(c)}

    # -- tasks and allocations -------------------------------------------------------------

    def _task_allocation(self, allocation: Allocation | None, allocation_id: str) -> Allocation:
        if allocation is None or allocation.id != allocation_id:
            raise api.ApiError(403, f"not the task token of allocation {allocation_id}")
        return allocation

    def api_GetTaskContextDirectory(
        self, *, params: dict[str, str], allocation: Allocation | None, **_: Any
    ) -> dict[str, Any]:
        with self.lock:
            for trial in self.trials.values():
                if trial.task_id == params["taskId"]:
                    files = self.experiments[trial.experiment_id].files
                    break
            else:
                raise api.ApiError(404, f"task not found: {params['taskId']}")
        return {"b64Tgz": base64.b64encode(_build_context_tgz(files)).decode()}

    def api_PostAllocationAcceleratorData(
        self, *, params: dict[str, str], body: Any, allocation: Allocation | None, **_: Any
    ) -> None:
        alloc = self._task_allocation(allocation, params["allocationId"])
        with self.lock:
            alloc.accelerator_data = body.acceleratorData.to_json(omit_unset=True)

    def api_AllocationRendezvousInfo(
        self, *, params: dict[str, str], allocation: Allocation | None, **_: Any
    ) -> dict[str, Any]:
        alloc = self._task_allocation(allocation, params["allocationId"])
        if params["resourcesId"] != alloc.resources_id:
            raise api.ApiError(404, f"resources not found: {params['resourcesId']}")
        # One container per allocation (one agent): it is rank 0 of 1, at the loopback.
        return {"rendezvousInfo": {"addresses": ["127.0.0.1"], "rank": 0, "slots": [alloc.slots]}}

    def api_AllocationPreemptionSignal(
        self,
        *,
        params: dict[str, str],
        query: dict[str, list[str]],
        allocation: Allocation | None,
        **_: Any,
    ) -> dict[str, Any]:
        alloc = self._task_allocation(allocation, params["allocationId"])
        timeout = float((query.get("timeout_seconds") or ["0"])[0] or 0)
        deadline = time.monotonic() + timeout
        with self.lock:
            while not alloc.preempt and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(timeout=min(left, 1.0))
            return {"preempt": alloc.preempt}

    def api_AckAllocationPreemptionSignal(
        self, *, params: dict[str, str], allocation: Allocation | None, **_: Any
    ) -> None:
        alloc = self._task_allocation(allocation, params["allocationId"])
        with self.lock:
            alloc.acked_preemption = True

    # -- scheduling and the agent ----------------------------------------------------------

    def _schedule(self) -> None:
        """Start every runnable trial that fits, FIFO by trial id (called with the lock)."""
        if self._closed:
            return
        used = sum(a.slots for a in self.allocations.values() if a.exit_code is None)
        for trial in sorted(self.trials.values(), key=lambda t: t.id):
            exp = self.experiments[trial.experiment_id]
            if exp.state != "ACTIVE" or trial.state != "ACTIVE" or trial.allocation is not None:
                continue
            slots = int(exp.config["resources"]["slots_per_trial"])
            if used + slots > self.slots:
                break
            used += slots
            self._start_allocation(exp, trial, slots)
        self.changed.notify_all()

    def _start_allocation(self, exp: Experiment, trial: Trial, slots: int) -> None:
        trial.run_id += 1
        alloc = Allocation(
            id=f"{trial.task_id}.{trial.run_id}",
            task_id=trial.task_id,
            trial_id=trial.id,
            resources_id=str(uuid.uuid4()),
            container_id=str(uuid.uuid4()),
            token=secrets.token_hex(16),
            slots=slots,
        )
        self.allocations[alloc.id] = alloc
        trial.allocation = alloc
        trial.allocations.append(alloc.id)
        trial.state = "RUNNING"
        latest = self.checkpoints.get(trial.latest_checkpoint or "")
        steps = int(((latest or {}).get("metadata") or {}).get("steps_completed", 0))
        env = image_environment()
        env.update(
            {
                # The agent's (containers/spec.go): master address, cluster, agent, slots.
                "DET_CLUSTER_ID": CLUSTER_ID,
                "DET_MASTER_ID": MASTER_ID,
                "DET_MASTER": self.url,
                "DET_MASTER_HOST": "127.0.0.1",
                "DET_MASTER_ADDR": "127.0.0.1",
                "DET_MASTER_PORT": str(self.port),
                "DET_AGENT_ID": AGENT_ID,
                "DET_CONTAINER_ID": alloc.container_id,
                "DET_SLOT_IDS": json.dumps(list(range(slots))),
                # The master's (tasks/task.go, task_trial.go, docker resources).
                "PYTHONUSERBASE": "/run/determined/pythonuserbase",
                "DET_TASK_ID": alloc.task_id,
                "DET_ALLOCATION_ID": alloc.id,
                "DET_RESOURCES_ID": alloc.resources_id,
                "DET_RESOURCES_TYPE": "docker-container",
                "DET_SESSION_TOKEN": alloc.token,
                "DET_USER_TOKEN": self._new_user_token(),
                "DET_USER": exp.username,
                "DET_WORKDIR": "/run/determined/workdir",
                "DET_RUN_DIR": "/run/determined",
                "DET_USE_TLS": "false",
                "DET_SEGMENT_ENABLED": "false",
                "DET_EXPERIMENT_ID": str(exp.id),
                "DET_TRIAL_ID": str(trial.id),
                "DET_TRIAL_RUN_ID": str(trial.run_id),
                "DET_TRIAL_SEED": str(trial.seed),
                "DET_EXPERIMENT_CONFIG": json.dumps(exp.config),
                "DET_HPARAMS": json.dumps(trial.hparams),
                "DET_STEPS_COMPLETED": str(steps),
                "DET_TASK_TYPE": "TRIAL",
            }
        )
        if latest is not None:
            env["DET_LATEST_CHECKPOINT"] = alloc.latest_checkpoint = latest["uuid"]
        env.update(self.task_environment)
        for item in exp.config["environment"]["environment_variables"]["cpu"]:
            key, _, value = str(item).partition("=")
            env[key] = value
        storage = exp.config["checkpoint_storage"]
        container = Container(
            self.root / "containers" / alloc.container_id,
            env=env,
            bind_mounts=exp.config["bind_mounts"],
            shared_fs=storage["host_path"] if storage["type"] == "shared_fs" else None,
            master_port=self.port,
            master_socket=self.socket_path,
            on_line=lambda kind, line: self._log_line(trial.id, alloc.container_id, kind, line),
        )
        alloc.container = container
        self._log_line(
            trial.id,
            None,
            "stdout",
            f"Trial {trial.id} (Experiment {exp.id}) was assigned "
            f"to an agent (allocation {alloc.id}, run {trial.run_id})\n",
            source="master",
        )
        container.start()
        threading.Thread(target=self._watch, args=(alloc,), daemon=True).start()

    def _log_line(
        self,
        trial_id: int,
        container_id: str | None,
        kind: str,
        line: str,
        source: str = "container",
    ) -> None:
        rank = None
        m = re.match(r"\[rank=(\d+)\] ", line)
        if m:
            rank = int(m.group(1))
        with self.lock:
            self.logs.append(
                LogLine(
                    id=len(self.logs) + 1,
                    trial_id=trial_id,
                    timestamp=api.now(),
                    log=line,
                    stdtype=kind,
                    container_id=container_id,
                    rank=rank,
                    source=source,
                )
            )
        if os.environ.get("STANDIN_MASTER_ECHO"):
            sys.stderr.write(f"[trial {trial_id}] {line}")

    def _watch(self, alloc: Allocation) -> None:
        assert alloc.container is not None
        rc = alloc.container.wait()
        with self.lock:
            alloc.exit_code = rc
            trial = self.trials[alloc.trial_id]
            exp = self.experiments[trial.experiment_id]
            trial.allocation = None
            self._log_line(
                trial.id,
                None,
                "stdout",
                f"container {alloc.container_id} exited: {rc}\n",
                source="master",
            )
            if exp.state == "STOPPING_CANCELED":
                trial.state = "CANCELED"
            elif rc == 0 and not alloc.preempt:
                trial.state = "COMPLETED"
            elif rc == 0:
                # Preempted (paused): resumed from its latest checkpoint when activated.
                trial.state = "PAUSED" if exp.state == "PAUSED" else "ACTIVE"
            elif trial.restarts < int(exp.config["max_restarts"]) and not self._closed:
                trial.restarts += 1
                trial.state = "PAUSED" if exp.state == "PAUSED" else "ACTIVE"
            else:
                trial.state = "ERROR"
            if trial.state in TERMINAL_TRIAL_STATES:
                trial.end_time = api.now()
            self._maybe_finish(exp)
            self._schedule()

    def _maybe_finish(self, exp: Experiment) -> None:
        trials = [self.trials[t] for t in exp.trial_ids]
        if not all(t.state in TERMINAL_TRIAL_STATES for t in trials):
            return
        if exp.state == "STOPPING_CANCELED":
            exp.state = "CANCELED"
        elif all(t.state == "ERROR" for t in trials):
            exp.state = "ERROR"
        else:
            exp.state = "COMPLETED"
        exp.end_time = api.now()
        self.changed.notify_all()


# ------------------------------------------------------------------------------------------
# Listing helpers.


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _paginate(items: list[Any], query: dict[str, list[str]]) -> tuple[list[Any], dict[str, Any]]:
    offset = int((query.get("offset") or ["0"])[0] or 0)
    limit = int((query.get("limit") or ["0"])[0] or 0)
    end = len(items) if limit <= 0 else min(len(items), offset + limit)
    start = min(offset, len(items))
    page = items[start:end]
    return page, {
        "offset": offset,
        "limit": limit,
        "startIndex": start,
        "endIndex": end,
        "total": len(items),
    }


def _sorted_checkpoints(
    checkpoints: list[dict[str, Any]], query: dict[str, list[str]]
) -> dict[str, Any]:
    states = set(query.get("states") or [])
    if states:
        checkpoints = [c for c in checkpoints if c["state"] in states]
    descending = (query.get("orderBy") or [""])[0] == "ORDER_BY_DESC"
    metric = (query.get("sortByMetric") or [None])[0]
    attr = (query.get("sortByAttr") or ["SORT_BY_UNSPECIFIED"])[0]
    if metric:
        have = [c for c in checkpoints if _finite(_metric_of(c, metric))]
        missing = [c for c in checkpoints if not _finite(_metric_of(c, metric))]
        have.sort(key=lambda c: float(_metric_of(c, metric)), reverse=descending)
        checkpoints = have + missing  # no value: last, whatever the order
    elif attr != "SORT_BY_UNSPECIFIED":
        keys: dict[str, Callable[[dict[str, Any]], Any]] = {
            "SORT_BY_UUID": lambda c: c["uuid"],
            "SORT_BY_TRIAL_ID": lambda c: c["training"]["trialId"],
            "SORT_BY_BATCH_NUMBER": lambda c: c["metadata"].get("steps_completed", 0),
            "SORT_BY_END_TIME": lambda c: c["reportTime"],
            "SORT_BY_STATE": lambda c: c["state"],
            "SORT_BY_SEARCHER_METRIC": lambda c: c["training"].get("searcherMetric") or 0.0,
        }
        checkpoints.sort(key=keys[attr], reverse=descending)
    page, pagination = _paginate(checkpoints, query)
    return {"checkpoints": page, "pagination": pagination}


def _metric_of(c: dict[str, Any], metric: str) -> Any:
    return ((c["training"].get("validationMetrics") or {}).get("avgMetrics") or {}).get(metric)


def _best_checkpoint(
    checkpoints: list[dict[str, Any]], metric: str | None, smaller: bool
) -> dict[str, Any] | None:
    scored = [c for c in checkpoints if metric and _finite(_metric_of(c, metric))]
    if not scored:
        return None
    return sorted(scored, key=lambda c: float(_metric_of(c, metric)) * (1 if smaller else -1))[0]


# ------------------------------------------------------------------------------------------
# HTTP.


def _handler_class(master: StandInMaster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s", format % args)

        def address_string(self) -> str:
            return "container" if isinstance(self.client_address, str) else super().address_string()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, answer, stream = master.handle(self.command, self.path, self.headers, body)
            except api.ApiError as e:
                self._send(e.status, e.body())
                return
            except Exception as e:  # noqa: BLE001 - a stand-in crash must fail the test
                import traceback

                message = f"{self.command} {self.path}: stand-in crashed: {e!r}"
                with master.lock:
                    master.problems.append(message + "\n" + traceback.format_exc())
                self._send(500, api.ApiError(500, message).body())
                return
            if stream:
                data = b"".join(json.dumps({"result": r}).encode() + b"\n" for r in answer)
                self._send_raw(status, data)
            else:
                self._send(status, answer)

        def _send(self, status: int, obj: Any) -> None:
            self._send_raw(status, json.dumps(obj).encode())

        def _send_raw(self, status: int, data: bytes) -> None:
            # A task that exits during a long-poll (the preemption watcher is a daemon thread)
            # has closed its end: nothing to answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler
