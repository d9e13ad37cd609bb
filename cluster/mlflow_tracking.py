"""MLflow plumbing shared by the live logger (during training) and the mirror (after it).

- where the store is: `default_tracking_uri` (``$MLFLOW_TRACKING_URI``, else a SQLite store in
  the runs folder), `resolve_tracking_uri` (the experiment's ``mlflow.tracking_uri`` first);
  `artifact_location` keeps a SQLite store's artifacts beside it;
- how calls are made: `with_retries` (connection-type failures, exponential backoff),
  `single_http_attempt` / `create_once` (never two runs or versions for one lost reply),
  `configure_quiet_mlflow_http` (one quick attempt per request while training);
- `MlflowLiveLogger`: metrics and dataset inputs logged as training goes, buffered when the
  server is down. Parameters reach MLflow only through `dataset_utils.redact.tracking_params`
  (one flatten + scrub).

mlflow itself is imported inside the functions that call it: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dataset_utils.errors import UserError
from dataset_utils.redact import tracking_params
from trainer.config import Hyperparameters

log = logging.getLogger(__name__)
T = TypeVar("T")

LIVE_RUN_KEY = "text2sql.live_run_key"


def with_retries(
    fn: Callable[[], T],
    what: str,
    tracking_uri: str,
    *,
    attempts: int | None = None,
    backoff_s: float | None = None,
) -> T:
    """Run an MLflow call, retrying connection-type failures with exponential backoff.

    Defaults: 5 attempts, 0.5 s doubling (0.5, 1, 2, 4 s); override with
    ``$TEXT2SQL_MLFLOW_RETRIES`` and ``$TEXT2SQL_MLFLOW_BACKOFF_S``.
    """
    from mlflow.exceptions import MlflowException

    if attempts is None:
        attempts = max(1, int(os.environ.get("TEXT2SQL_MLFLOW_RETRIES", "5")))
    if backoff_s is None:
        backoff_s = float(os.environ.get("TEXT2SQL_MLFLOW_BACKOFF_S", "0.5"))
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError, ConnectionError) as e:
            msg = str(e)
            # Errors the server *answered* (bad request, not found) will not heal with time.
            if isinstance(e, MlflowException) and not _transient(msg):
                raise
            last = e
            if i < attempts - 1:
                delay = backoff_s * 2**i
                log.warning(
                    "MLflow %s failed (%s); retrying in %.1f s",
                    what,
                    msg.splitlines()[0][:160] if msg else type(e).__name__,
                    delay,
                )
                time.sleep(delay)
    raise UserError(
        f"MLflow tracking server {tracking_uri} unreachable while {what} after {attempts} "
        f"attempts ({type(last).__name__}: {str(last).splitlines()[0][:200] if last else ''}). "
        "Nothing is lost: start the server and run the same command again to finish"
    )


def _transient(msg: str) -> bool:
    m = msg.lower()
    return any(
        s in m
        for s in (
            "connection",
            "max retries",
            "timed out",
            "timeout",
            "refused",
            "temporarily",
            "503",
            "502",
            "504",
            "reset by peer",
            "api request to",
            "database is locked",
        )
    )


def default_tracking_uri(runs_dir: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the SQLite store ``<runs_dir>/mlflow.db`` (default ./runs)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = (runs_dir or Path("runs")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def artifact_location(tracking_uri: str) -> str | None:
    """Keep artifacts of a local SQLite store beside it, not in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


@contextlib.contextmanager
def single_http_attempt() -> Iterator[None]:
    """MLflow's HTTP client retries every method, POST included, when a reply is lost
    (``urllib3.Retry(allowed_methods=None)`` in ``mlflow/utils/request_utils.py``): a create
    whose reply was lost is sent again and makes a second run or model version. Inside this
    block requests go out once; `create_once` decides what to do after a failure."""
    with env_var("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"):
        yield


@contextlib.contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` inside the block (MLflow reads its settings from the
    environment at each call), the previous value or its absence restored after."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def create_once(
    create: Callable[[], T], find: Callable[[], T | None], what: str, tracking_uri: str
) -> T:
    """Create something MLflow has no request id for (experiment, run, model version) without
    ever making two: each request is sent once, and before every retry ``find`` looks it up by
    the deterministic name or tag it was created with, in case the server made it but the
    reply was lost."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            found = find()
            if found is not None:
                log.info("MLflow %s: found the one a lost reply had created", what)
                return found
        with single_http_attempt():
            return create()

    return with_retries(attempt, what, tracking_uri)


def resolve_tracking_uri(hp: Hyperparameters, experiment_dir: Path) -> str:
    """A run's MLflow store: the YAML's ``mlflow.tracking_uri``, else `default_tracking_uri`
    of the runs folder the experiment lives in."""
    return hp.mlflow.tracking_uri or default_tracking_uri(experiment_dir.parent)


class MlflowLiveLogger:
    """Logs training metrics to MLflow as they happen, without ever stalling training.

    Metrics are buffered; each flush is one quick attempt. When the tracking server is down the
    buffer is kept (and a warning printed once) and retried at the next report and at the end,
    so a restarted server ends up with every metric, in order, with its step. Dataset inputs
    (`log_inputs`) go through the same buffer; ``experiment_tags`` are set on an experiment
    this logger creates.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        experiment_tags: dict[str, str] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.run_name = run_name
        self.tags = dict(tags or {})
        # Flattened and scrubbed here, whatever the caller passes: no credential reaches MLflow.
        self.params = tracking_params(params or {})
        self.experiment_tags = experiment_tags or {}
        self.buffer: list[tuple[str, float, int, int]] = []
        self.inputs: list[Any] = []  # mlflow.entities.DatasetInput, not yet sent
        self._warned = False
        self._client: Any = None
        # The run is found by this tag if a create_run's reply was lost (the server made the
        # run, we saw an error): retrying the create would make a second run.
        self._key = uuid.uuid4().hex
        self.tags[LIVE_RUN_KEY] = self._key
        self._create_attempted = False

    def _ensure_run(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment_name)
            # Artifacts of a local SQLite store go beside it (runs/mlartifacts), never into
            # ./mlruns of whatever directory the run was started from.
            exp_id = (
                exp.experiment_id
                if exp
                else self._client.create_experiment(
                    self.experiment_name,
                    artifact_location=artifact_location(self.tracking_uri),
                    tags=self.experiment_tags or None,
                )
            )
            run = None
            if self._create_attempted:
                found = self._client.search_runs(
                    [exp_id], filter_string=f"tags.`{LIVE_RUN_KEY}` = '{self._key}'", max_results=1
                )
                run = found[0] if found else None
            if run is None:
                self._create_attempted = True
                run = self._client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            if self.params:
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in self.params.items()]
                for i in range(0, len(items), 100):
                    self._client.log_batch(self.run_id, params=items[i : i + 100])
        del mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.buffer.extend((k, v, ts, step) for k, v in metrics.items())
        self.flush()

    def log_inputs(self, inputs: list[Any]) -> None:
        """Record dataset inputs (``mlflow.entities.DatasetInput``) on the run."""
        self.inputs.extend(inputs)
        self.flush()

    def flush(self) -> bool:
        if not self.buffer and not self.inputs:
            return True
        from mlflow.entities import Metric

        try:
            self._ensure_run()
            if self.inputs:
                self._client.log_inputs(self.run_id, datasets=list(self.inputs))
                self.inputs.clear()
            batch = [Metric(k, v, ts, step) for k, v, ts, step in self.buffer]
            for i in range(0, len(batch), 500):
                self._client.log_batch(self.run_id, metrics=batch[i : i + 500])
            self.buffer.clear()
            if self._warned:
                log.warning("MLflow tracking server is reachable again; buffered metrics sent")
                self._warned = False
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            if not self._warned:
                log.warning(
                    "MLflow logging failed (%s: %s); training continues, %d metric values "
                    "(and %d dataset inputs) buffered for retry",
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                    len(self.buffer),
                    len(self.inputs),
                )
                self._warned = True
            return False

    def close(self, status: str = "FINISHED", retries: int = 7, backoff_s: float = 1.0) -> None:
        # 7 tries with doubling waits: about 2 minutes, long enough for a tracking server
        # (or its pod) to restart, short next to any training run.
        for attempt in range(retries):
            if self.flush():
                break
            time.sleep(backoff_s * 2**attempt)
        if self.buffer or self.inputs:
            log.warning(
                "MLflow still unreachable at the end of training: %d metric values were not "
                "sent to the live run (the trial's metrics.jsonl has them all; the mirror logs "
                "the datasets)",
                len(self.buffer),
            )
        try:
            if self.run_id is not None:
                self._ensure_run()
                self._client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            log.warning("could not close the MLflow run: %s", e)


def configure_quiet_mlflow_http() -> None:
    """One quick attempt per MLflow request during training (we buffer and retry ourselves)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
