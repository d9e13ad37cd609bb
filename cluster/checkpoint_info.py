"""What every checkpoint source returns, and how a downloaded checkpoint is verified.

`CheckpointSource` is the one interface the export / MLflow-mirroring code talks to. It uses only
plain Python types (`CheckpointInfo`, `MetricHistory`), so the local run store's implementation
(`cluster.local_source`) sits beside the Determined one (`cluster.checkpoint_source`) without
importing Determined. `best_of` is the shared ranking rule; `verify_checkpoint_dir` checks a
download against the sizes recorded when the checkpoint was uploaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from dataset_utils.errors import UserError

# Checkpoint states, without Determined's "STATE_" prefix so other sources can use them too.
STATE_COMPLETED = "COMPLETED"

# Group name -> [(steps_completed, {metric name: value})], sorted by steps.
MetricHistory = dict[str, list[tuple[int, dict[str, float]]]]

METRIC_GROUPS = ("training", "validation")

# How many offending files a verification error lists before summarising the rest; the CLI
# prints UserError as one line.
_MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint and everything needed to rank, fetch, verify and cite it.

    ``resources`` maps each path inside the checkpoint to its size in bytes, as recorded when the
    checkpoint was uploaded; directory entries end in "/" and have size 0.
    """

    uuid: str
    experiment_id: int
    trial_id: int
    steps_completed: int | None
    state: str
    searcher_metric: str
    metric_value: float | None
    smaller_is_better: bool
    resources: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    experiment_config: dict[str, Any] = field(default_factory=dict)
    report_time: str | None = None


@runtime_checkable
class CheckpointSource(Protocol):
    """Where a trained checkpoint comes from (a Determined experiment, a local run store...)."""

    def best_checkpoint(self) -> CheckpointInfo:
        """The best COMPLETED checkpoint by the searcher metric; UserError if there is none."""
        ...

    def download(self, info: CheckpointInfo, dest: Path) -> Path:
        """Download ``info`` into the empty or absent directory ``dest``, verify it, return it."""
        ...

    def metric_history(self, info: CheckpointInfo) -> MetricHistory:
        """Metrics of the checkpoint's trial: {"training"|"validation": [(steps, metrics)]}."""
        ...

    def describe(self) -> dict[str, str]:
        """Tags that link an exported model back to where it was trained."""
        ...

    def wait_until_done(self, poll_s: float = 30.0, timeout_s: float | None = None) -> None:
        """Block until the run completes; UserError if it failed, was canceled or timed out."""
        ...


def verify_checkpoint_dir(path: Path, resources: Mapping[str, int]) -> None:
    """Check that every file recorded in ``resources`` exists under ``path`` with its size.

    Directory entries (names ending in "/") are skipped. Files on disk that are not recorded are
    allowed (the SDK writes ``metadata.json`` into old checkpoints that lack one). Raises
    `UserError` naming each missing or wrong-sized file with expected and actual size.
    """
    if not path.is_dir():
        raise UserError(
            f"checkpoint directory {path} does not exist or is not a directory; "
            "download the checkpoint first"
        )
    problems: list[str] = []
    for name, expected in sorted(resources.items()):
        if name.endswith("/"):
            continue
        relative = PurePosixPath(name)
        # The names come from the master; one escaping the directory would make us vouch for
        # (and callers later read) a file outside the checkpoint.
        if relative.is_absolute() or ".." in relative.parts:
            raise UserError(
                f"checkpoint file list names an unsafe path {name!r} (absolute or containing "
                "'..'); refusing to verify it"
            )
        file = path.joinpath(*relative.parts)
        if not file.is_file():
            problems.append(f"{name} is missing (expected {expected} bytes, found none)")
            continue
        actual = file.stat().st_size
        if actual != expected:
            kind = "truncated" if actual < expected else "has the wrong size"
            problems.append(f"{name} {kind} (expected {expected} bytes, found {actual})")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
        if len(problems) > _MAX_LISTED_PROBLEMS:
            listed += f"; and {len(problems) - _MAX_LISTED_PROBLEMS} more"
        raise UserError(
            f"checkpoint in {path} is incomplete: {listed}; delete the directory and download "
            "the checkpoint again"
        )


def searcher_settings(experiment_config: Mapping[str, Any]) -> tuple[str, bool]:
    """Return (searcher metric name, smaller_is_better) from an experiment config."""
    searcher = experiment_config.get("searcher") or {}
    metric = searcher.get("metric")
    if not isinstance(metric, str) or not metric:
        raise UserError(
            "experiment config has no searcher.metric, so there is no way to rank its "
            f"checkpoints; found searcher={dict(searcher)!r}"
        )
    # Determined's schema default: a master always fills it in, an old or hand-written config
    # may not.
    smaller_is_better = searcher.get("smaller_is_better", True)
    return metric, bool(smaller_is_better)


def _finite_float(value: Any) -> float | None:
    # bool is an int subclass but never a metric; NaN and infinities cannot be ranked sensibly.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep only the scalar numeric metrics; trials may also report strings or lists."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        number = _finite_float(value)
        if number is not None:
            out[name] = number
    return out


def best_of(infos: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """Best COMPLETED checkpoint with a metric value among ``infos``, or None.

    Shared ranking rule for other `CheckpointSource` implementations: lowest (or highest, per
    ``smaller_is_better``) metric value, ties going to the later step.
    """
    candidates = [i for i in infos if i.state == STATE_COMPLETED and i.metric_value is not None]
    if not candidates:
        return None

    def rank(info: CheckpointInfo) -> tuple[float, int]:
        assert info.metric_value is not None
        sign = 1.0 if info.smaller_is_better else -1.0
        return sign * info.metric_value, -(info.steps_completed or 0)

    return min(candidates, key=rank)
