"""The off-cluster stand-in for a Determined master: a run directory on local disk.

Layout (one experiment = one folder; each launch of it is a trial)::

    runs/<experiment-name>/
        experiment.yaml              the resolved experiment config (hparams included)
        trial-<n>/
            trial.json               status, ids, timestamps, MLflow run id
            metrics.jsonl            {"group", "steps_completed", "metrics", "time"} per report
            checkpoints/<uuid>/      Determined's shared_fs layout: files + metadata.json
            checkpoints.jsonl        index: uuid, steps, state, metrics, resources (file sizes)
            hf_output/               the Trainer's scratch output_dir

Checkpoints are written atomically: files are copied into ``checkpoints/.tmp-<uuid>`` and
renamed into place only once complete (and fsynced), then indexed. A crash at any point leaves
either a complete, indexed checkpoint or nothing (a stray temp folder is ignored and removed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, default=str) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # A torn last line from a killed process: everything before it is intact.
                continue
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class TrialDir:
    """One trial's folder: metrics, checkpoints and status."""

    path: Path

    @property
    def experiment_dir(self) -> Path:
        return self.path.parent

    @property
    def trial_id(self) -> int:
        return int(self.path.name.split("-", 1)[1])

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def hf_output_dir(self) -> Path:
        return self.path / "hf_output"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def index_file(self) -> Path:
        return self.path / "checkpoints.jsonl"

    # ---- status -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        f = self.path / "trial.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = self.info()
        info.update(fields)
        info["updated"] = _now()
        write_json_atomic(self.path / "trial.json", info)
        return info

    # ---- metrics ------------------------------------------------------------------------
    def report_metrics(self, group: str, steps_completed: int, metrics: dict[str, Any]) -> None:
        append_jsonl(
            self.metrics_file,
            {
                "group": group,
                "steps_completed": steps_completed,
                "metrics": metrics,
                "time": _now(),
            },
        )

    def metric_history(self) -> dict[str, list[tuple[int, dict[str, float]]]]:
        out: dict[str, list[tuple[int, dict[str, float]]]] = {"training": [], "validation": []}
        for r in read_jsonl(self.metrics_file):
            out.setdefault(r["group"], []).append((int(r["steps_completed"]), r["metrics"]))
        return out

    # ---- checkpoints --------------------------------------------------------------------
    def clean_partial(self) -> list[Path]:
        """Remove temp folders left by a killed writer; return what was removed."""
        removed = []
        if self.checkpoints_dir.is_dir():
            for p in self.checkpoints_dir.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def store_checkpoint(
        self,
        source: Path,
        metadata: dict[str, Any],
        *,
        copy: Callable[[Path, Path], Any] | None = None,
    ) -> dict[str, Any]:
        """Copy a finished checkpoint folder into the store atomically and index it."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        uuid = str(uuidlib.uuid4())
        tmp = self.checkpoints_dir / f".tmp-{uuid}"
        try:
            (copy or shutil.copytree)(source, tmp)
            meta = {**metadata, "uuid": uuid, "report_time": _now()}
            (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
            resources = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
                    resources[str(f.relative_to(tmp))] = f.stat().st_size
            _fsync_dir(tmp)
            final = self.checkpoints_dir / uuid
            os.replace(tmp, final)
            _fsync_dir(self.checkpoints_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == 28:  # ENOSPC
                raise UserError(
                    f"no space left on device while writing checkpoint to {self.checkpoints_dir}; "
                    "the previous checkpoint is intact. Free space and re-run to resume."
                ) from None
            raise
        entry = {
            "uuid": uuid,
            "steps_completed": metadata.get("steps_completed"),
            "state": "COMPLETED",
            "metrics": metadata.get("metrics", {}),
            "resources": resources,
            "report_time": meta["report_time"],
        }
        append_jsonl(self.index_file, entry)
        return entry

    def checkpoints(self) -> list[dict[str, Any]]:
        """Indexed checkpoints whose folders exist, oldest first."""
        return [
            e for e in read_jsonl(self.index_file) if (self.checkpoints_dir / e["uuid"]).is_dir()
        ]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        cps = self.checkpoints()
        return max(cps, key=lambda e: e["steps_completed"] or 0) if cps else None

    def checkpoint_path(self, uuid: str) -> Path:
        return self.checkpoints_dir / uuid

    def prune(self, keep_latest: int, keep_best: int, metric: str | None, smaller: bool) -> None:
        """Delete checkpoints outside the latest/best sets (Determined's GC policy)."""
        cps = self.checkpoints()
        keep = {
            e["uuid"] for e in sorted(cps, key=lambda e: e["steps_completed"] or 0)[-keep_latest:]
        }
        if metric and keep_best > 0:
            scored = [e for e in cps if e.get("metrics", {}).get(metric) is not None]
            scored.sort(key=lambda e: e["metrics"][metric], reverse=not smaller)
            keep |= {e["uuid"] for e in scored[:keep_best]}
        for e in cps:
            if e["uuid"] not in keep:
                shutil.rmtree(self.checkpoints_dir / e["uuid"], ignore_errors=True)


@dataclass
class ExperimentDir:
    path: Path

    def trials(self) -> list[TrialDir]:
        if not self.path.is_dir():
            return []
        ts = [TrialDir(p) for p in self.path.glob("trial-*") if p.is_dir()]
        return sorted(ts, key=lambda t: t.trial_id)

    def new_trial(self) -> TrialDir:
        n = max((t.trial_id for t in self.trials()), default=0) + 1
        t = TrialDir(self.path / f"trial-{n}")
        t.path.mkdir(parents=True)
        t.update_info(trial_id=n, state="ACTIVE", created=_now())
        return t

    def resumable_trial(self) -> TrialDir | None:
        """The latest trial that did not finish (preempted, killed, errored)."""
        ts = self.trials()
        if ts and ts[-1].info().get("state") != "COMPLETED":
            return ts[-1]
        return None
