"""Find, download and verify the best checkpoint of a fine-tuning run.

`DeterminedCheckpointSource` implements `cluster.checkpoint_info.CheckpointSource` (the one
interface the export / MLflow-mirroring code talks to; plain Python types, so the local run
store's implementation needs no Determined) with the public Determined SDK (0.38.1):

- **Credentials** come only from the environment or Determined's own login store, exactly as the
  SDK resolves them: ``DET_USER`` + ``DET_USER_TOKEN`` (set inside Determined tasks),
  ``DET_USER`` + ``DET_PASS``, or the token saved by ``det user login``. There is deliberately no
  password argument: anything passed as an argument ends up in shell history, CI logs or
  ``repr()`` output. The master URL comes from the ``master`` argument or ``DET_MASTER``.
- **Ranking**: the searcher metric and ``smaller_is_better`` are read from the experiment's
  config (``searcher.metric`` / ``searcher.smaller_is_better``, which the master has already
  filled with its default, true, when the user left it out). The SDK is asked for the
  checkpoints sorted by that metric in that order, and it follows the offset pagination to the
  last page. The best one is then chosen here over *all* pages, skipping every checkpoint that is
  not ``COMPLETED`` or has no finite value for the metric: a running experiment gains and
  garbage-collects checkpoints between page requests, so page order alone is not trusted.
- **Download** goes through ``Checkpoint.download`` (direct storage access, falling back to a
  proxied download through the master). ``include=`` globs narrow it to the files an export
  needs, through the storage manager's selector; the SDK's ``Checkpoint.download`` itself has no
  selector in 0.38.1. Every download is then checked by `verify_checkpoint_dir` against the
  sizes the master recorded.

Security: checkpoint directories written by Determined trainers contain pickles
(``trial_state.pkl``, ``*.pth``) and this module never loads any file it downloads. Callers must
read weights with ``safetensors`` or ``torch.load(path, weights_only=True)``, never plain
``torch.load`` / ``pickle.load``: a checkpoint is data from a shared cluster, and unpickling it
runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from determined import errors as det_errors
from determined.common import api, storage
from determined.common.api import errors as api_errors
from determined.experimental import client as det_client

from cluster.checkpoint_info import (
    METRIC_GROUPS,
    STATE_COMPLETED,
    CheckpointInfo,
    MetricHistory,
    _finite_float,
    _numeric_metrics,
    best_of,
    searcher_settings,
    verify_checkpoint_dir,
)
from dataset_utils.errors import UserError

logger = logging.getLogger(__name__)

# Experiment states from which the experiment will never produce a usable final checkpoint.
_FAILED_EXPERIMENT_STATES = {
    det_client.ExperimentState.ERROR,
    det_client.ExperimentState.CANCELED,
    det_client.ExperimentState.DELETED,
    det_client.ExperimentState.DELETING,
    det_client.ExperimentState.DELETE_FAILED,
}


class DeterminedCheckpointSource:
    """`CheckpointSource` for one Determined experiment, through the Determined SDK.

    Arguments:
        experiment_id: the experiment to take the checkpoint from.
        master: master URL; defaults to ``DET_MASTER`` (then ``DET_MASTER_ADDR``,
            ``localhost:8080``), as in the SDK.
        client: an already logged-in ``Determined`` client (tests, or callers that hold one);
            pass ``master`` too so that `describe` names the same master. By default a client
            is created, and logged in from the environment / login store, on first use.
        include: glob patterns (``fnmatch``, "*" also matches "/") of checkpoint files to
            download, e.g. ``["adapter_model.safetensors", "adapter_config.json"]``; only those
            are fetched and verified. ``None`` downloads and verifies everything.
    """

    def __init__(
        self,
        experiment_id: int,
        master: str | None = None,
        *,
        client: det_client.Determined | None = None,
        include: Sequence[str] | None = None,
    ) -> None:
        if isinstance(experiment_id, bool) or not isinstance(experiment_id, int):
            raise UserError(f"experiment id must be an integer, got {experiment_id!r}")
        if experiment_id <= 0:
            raise UserError(f"experiment id must be a positive integer, got {experiment_id}")
        raw_master = master or api.get_default_master_url()
        try:
            self._master = api.canonicalize_master_url(raw_master)
        except ValueError as e:
            raise UserError(
                f"invalid Determined master URL {raw_master!r}: {e}; set DET_MASTER to "
                "host:port or http(s)://host:port"
            ) from e
        self._experiment_id = experiment_id
        self._client = client
        self._include = tuple(include) if include is not None else None
        if self._include is not None and not self._include:
            raise UserError("include= must name at least one file pattern, or be None for all")
        self._best: CheckpointInfo | None = None

    def __repr__(self) -> str:
        # No credentials live on this object; the repr is safe to log.
        return (
            f"DeterminedCheckpointSource(experiment_id={self._experiment_id}, "
            f"master={self._master!r})"
        )

    @property
    def master(self) -> str:
        return self._master

    @property
    def experiment_id(self) -> int:
        return self._experiment_id

    @property
    def client(self) -> det_client.Determined:
        # Logging in lazily keeps construction free of network calls (and of prompts).
        if self._client is None:
            with self._sdk_errors("logging in"):
                self._client = det_client.Determined(master=self._master)
        return self._client

    # -- CheckpointSource --------------------------------------------------------------------

    def best_checkpoint(self) -> CheckpointInfo:
        """The best COMPLETED checkpoint; resolved once, then cached on this object."""
        if self._best is None:
            self._best = self._find_best()
        return self._best

    def download(self, info: CheckpointInfo, dest: Path) -> Path:
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            # The SDK skips the download when the target already holds a metadata.json, so a
            # stale or foreign checkpoint there would be silently kept.
            raise UserError(
                f"download destination {dest} already exists and is not an empty directory; "
                "choose a new directory or delete it"
            )
        with self._sdk_errors(f"reading checkpoint {info.uuid}"):
            # Re-read rather than trust `info`: checkpoint GC may have deleted it since listing.
            checkpoint = self.client.get_checkpoint(info.uuid)
        state = _state_name(checkpoint.state)
        if state != STATE_COMPLETED:
            raise UserError(
                f"checkpoint {info.uuid} is now in state {state}, not {STATE_COMPLETED}; "
                "it can no longer be downloaded whole"
            )
        expected = self._expected_files(info)
        try:
            if self._include is None:
                checkpoint.download(str(dest), mode=det_client.DownloadMode.AUTO)
            else:
                self._download_selected(checkpoint, dest)
        except (
            det_errors.MultipleDownloadsFailed,
            det_errors.ProxiedDownloadFailed,
            det_errors.CheckpointNotFound,
            det_errors.NoDirectStorageAccess,
        ) as e:
            raise UserError(
                f"could not download checkpoint {info.uuid} from its storage or through master "
                f"{self._master}: {e}"
            ) from e
        verify_checkpoint_dir(dest, expected)
        logger.info("downloaded and verified checkpoint %s into %s", info.uuid, dest)
        return dest

    def metric_history(self, info: CheckpointInfo) -> MetricHistory:
        history: MetricHistory = {}
        with self._sdk_errors(f"reading metrics of trial {info.trial_id}"):
            trial = self.client.get_trial(info.trial_id)
            for group in METRIC_GROUPS:
                # iter_metrics streams lazily, so it is consumed inside the error mapping.
                points = [
                    (int(report.steps_completed), _numeric_metrics(report.metrics))
                    for report in trial.iter_metrics(group)
                ]
                points.sort(key=lambda point: point[0])
                history[group] = points
        return history

    def describe(self) -> dict[str, str]:
        info = self.best_checkpoint()
        return {
            "determined.master": self._master,
            "determined.experiment_id": str(info.experiment_id),
            "determined.trial_id": str(info.trial_id),
            "determined.checkpoint_uuid": info.uuid,
        }

    def wait_until_done(self, poll_s: float = 30.0, timeout_s: float | None = None) -> None:
        """Poll the experiment until it is COMPLETED.

        ERROR / CANCELED / DELETED raise `UserError`, as does still running after ``timeout_s``
        (``None``: no limit). A PAUSED experiment is waited on: someone may resume it.
        """
        if poll_s <= 0:
            raise UserError(f"poll interval must be positive, got {poll_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        experiment_label = f"experiment {self._experiment_id}"
        with self._sdk_errors(f"reading {experiment_label}"):
            experiment = self.client.get_experiment(self._experiment_id)
        last_state: det_client.ExperimentState | None = None
        while True:
            state = experiment.state
            if state == det_client.ExperimentState.COMPLETED:
                # Checkpoints listed while it ran may since have been superseded or GC'd.
                self._best = None
                return
            if state in _FAILED_EXPERIMENT_STATES:
                assert state is not None
                raise UserError(
                    f"{experiment_label} on {self._master} ended in state {state.value}, not "
                    f"{det_client.ExperimentState.COMPLETED.value}; see its trial logs "
                    f"(det trial logs <trial id>) and fix the run before exporting"
                )
            if state != last_state:
                logger.info("%s is %s", experiment_label, state.value if state else "unknown")
                last_state = state
            sleep_s = poll_s
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UserError(
                        f"{experiment_label} is still {state.value if state else 'unknown'} "
                        f"after {timeout_s} s; wait longer (raise the timeout) or check it on "
                        f"{self._master}"
                    )
                sleep_s = min(poll_s, remaining)
            time.sleep(sleep_s)
            with self._sdk_errors(f"reading {experiment_label}"):
                experiment.reload()

    # -- internals ---------------------------------------------------------------------------

    def _find_best(self) -> CheckpointInfo:
        label = f"experiment {self._experiment_id}"
        with self._sdk_errors(f"reading {label}"):
            experiment = self.client.get_experiment(self._experiment_id)
        metric, smaller_is_better = searcher_settings(experiment.config or {})
        order = det_client.OrderBy.ASC if smaller_is_better else det_client.OrderBy.DESC
        with self._sdk_errors(f"listing checkpoints of {label}"):
            # Without max_results the SDK reads every page (offset = previous page's endIndex).
            checkpoints = experiment.list_checkpoints(sort_by=metric, order_by=order)

        candidates: list[CheckpointInfo] = []
        skipped: Counter[str] = Counter()
        for checkpoint in checkpoints:
            info = self._to_info(checkpoint, metric, smaller_is_better)
            if info is None:
                skipped["not from a trial"] += 1
            elif info.state != STATE_COMPLETED:
                skipped[f"state {info.state}"] += 1
            elif info.metric_value is None:
                skipped[f"no value for {metric}"] += 1
            else:
                candidates.append(info)
        if skipped:
            logger.info("%s: skipped checkpoints: %s", label, dict(skipped))
        if not candidates:
            seen = f"{sum(skipped.values())} skipped ({dict(skipped)})" if skipped else "none"
            raise UserError(
                f"{label} on {self._master} has no {STATE_COMPLETED} checkpoint with a value for "
                f"its searcher metric {metric!r} (checkpoints found: {seen}); wait for a "
                "validation to finish, or check checkpoint_storage and checkpoint GC settings"
            )

        best = best_of(candidates)
        assert best is not None  # candidates is non-empty and already filtered
        logger.info(
            "%s: best checkpoint %s (trial %s, step %s): %s=%s (%s is better)",
            label,
            best.uuid,
            best.trial_id,
            best.steps_completed,
            metric,
            best.metric_value,
            "smaller" if smaller_is_better else "larger",
        )
        return best

    @staticmethod
    def _to_info(
        checkpoint: det_client.Checkpoint, metric: str, smaller_is_better: bool
    ) -> CheckpointInfo | None:
        training = checkpoint.training
        if training is None:
            return None  # e.g. uploaded by a non-trial task: not ranked by the searcher
        # The SDK keeps the validation that produced the checkpoint as {"avgMetrics": {...}}.
        avg_metrics = (training.validation_metrics or {}).get("avgMetrics") or {}
        metadata = dict(checkpoint.metadata or {})
        steps = metadata.get("steps_completed")
        return CheckpointInfo(
            uuid=checkpoint.uuid,
            experiment_id=int(training.experiment_id),
            trial_id=int(training.trial_id),
            steps_completed=int(steps) if isinstance(steps, int) else None,
            state=_state_name(checkpoint.state),
            searcher_metric=metric,
            metric_value=_finite_float(avg_metrics.get(metric)),
            smaller_is_better=smaller_is_better,
            # The REST API sends sizes as strings (int64 in JSON).
            resources={name: int(size) for name, size in (checkpoint.resources or {}).items()},
            metadata=metadata,
            hparams=dict(training.hparams or {}),
            experiment_config=dict(training.experiment_config or {}),
            report_time=checkpoint.report_time,
        )

    def _selected(self, name: str) -> bool:
        """Storage-manager selector: directories ("x/") are created on demand for their files."""
        if self._include is None:
            return True
        if name.endswith("/"):
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self._include)

    def _expected_files(self, info: CheckpointInfo) -> dict[str, int]:
        if self._include is None:
            return dict(info.resources)
        expected = {name: size for name, size in info.resources.items() if self._selected(name)}
        if not expected:
            files = sorted(name for name in info.resources if not name.endswith("/"))
            raise UserError(
                f"include={list(self._include)} matches no file of checkpoint {info.uuid}; "
                f"it holds {files}"
            )
        return expected

    def _download_selected(self, checkpoint: det_client.Checkpoint, dest: Path) -> None:
        training = checkpoint.training
        storage_config = training.experiment_config.get("checkpoint_storage") if training else None
        if not storage_config:
            raise UserError(
                f"checkpoint {checkpoint.uuid} has no checkpoint_storage in its experiment config"
            )
        try:
            manager = storage.build(storage_config, container_path=None)
            manager.download(checkpoint.uuid, str(dest), selector=self._selected)
        except (
            det_errors.NoDirectStorageAccess,
            det_errors.CheckpointNotFound,
            FileNotFoundError,
            ImportError,
        ) as e:
            # Storage not reachable from here (or its client library missing): the master can
            # still proxy the download, but only of the whole checkpoint.
            logger.warning(
                "cannot read checkpoint storage directly (%s); downloading the whole checkpoint "
                "%s instead of only %s",
                e,
                checkpoint.uuid,
                list(self._include or ()),
            )
            if dest.exists():
                # A partial copy may contain metadata.json, which makes the SDK skip the download.
                shutil.rmtree(dest)
            checkpoint.download(str(dest), mode=det_client.DownloadMode.AUTO)

    @contextlib.contextmanager
    def _sdk_errors(self, doing: str) -> Iterator[None]:
        """Turn the SDK's auth / not-found / unreachable errors into one-line UserErrors."""
        try:
            yield
        except api_errors.UnauthenticatedException as e:
            raise UserError(
                f"not authenticated to Determined master {self._master} while {doing}: run "
                "`det user login`, or set DET_USER with DET_USER_TOKEN (or DET_PASS)"
            ) from e
        except api_errors.ForbiddenException as e:
            raise UserError(
                f"Determined master {self._master} refused access while {doing}: {e}; check "
                "that your user may read this experiment's workspace"
            ) from e
        except api_errors.NotFoundException as e:
            raise UserError(
                f"not found on Determined master {self._master} while {doing}: {e}; check the "
                "experiment id and DET_MASTER"
            ) from e
        except api_errors.MasterNotFoundException as e:
            raise UserError(
                f"cannot reach Determined master at {self._master} while {doing}; set DET_MASTER "
                "(or pass master=) to a reachable master"
            ) from e


def _state_name(state: Any) -> str:
    """'STATE_COMPLETED' (SDK enum or str) -> 'COMPLETED'."""
    if state is None:
        return "UNSPECIFIED"
    raw = str(getattr(state, "value", state))
    return raw.removeprefix("STATE_")
