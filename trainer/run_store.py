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
renamed into place only once complete (and fsynced), then indexed. Garbage collection renames a
checkpoint to ``.tmp-gc-<uuid>`` before deleting it. So a crash (kill -9, power loss) at any
point leaves every ``checkpoints/<uuid>`` folder complete; stray ``.tmp-*`` folders are removed
and a complete folder the crash left unindexed is indexed by `TrialDir.clean_partial` at the
next start (tests/faults/ kills runs at random points to hold this).
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
    with path.open("a+b") as fh:
        # A process killed mid-write leaves a torn last line without its newline: start on a
        # fresh line, or this record would be glued to the fragment and lost with it.
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode("utf-8"))
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
        """Recover from a killed writer: remove temp folders (half-written or half-deleted
        checkpoints) and index complete checkpoints whose index line was never written.
        Returns the temp folders removed."""
        removed = []
        if not self.checkpoints_dir.is_dir():
            return removed
        indexed = {e.get("uuid") for e in read_jsonl(self.index_file)}
        for p in sorted(self.checkpoints_dir.iterdir()):
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.is_dir() and p.name not in indexed:
                try:
                    meta = json.loads((p / "metadata.json").read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # not ours (only complete folders are ever renamed into place)
                append_jsonl(self.index_file, self._index_entry(p, meta))
        return removed

    @staticmethod
    def _index_entry(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "uuid": folder.name,
            "steps_completed": meta.get("steps_completed"),
            "state": "COMPLETED",
            "metrics": meta.get("metrics", {}),
            "resources": {
                str(f.relative_to(folder)): f.stat().st_size
                for f in sorted(folder.rglob("*"))
                if f.is_file()
            },
            "report_time": meta.get("report_time"),
        }

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
                # Rename first: a crash mid-delete must not leave a half-deleted folder that
                # still looks like a checkpoint.
                doomed = self.checkpoints_dir / f".tmp-gc-{e['uuid']}"
                try:
                    os.replace(self.checkpoints_dir / e["uuid"], doomed)
                except OSError:
                    continue
                _fsync_dir(self.checkpoints_dir)
                shutil.rmtree(doomed, ignore_errors=True)


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
