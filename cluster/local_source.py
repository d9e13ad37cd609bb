"""`CheckpointSource` over the local run store of off-cluster trials (see trainer.run_store).

Same interface as `cluster.checkpoint_source.DeterminedCheckpointSource`, so the mirror flow
(best checkpoint -> verify -> evaluate -> MLflow) does not care where training ran.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.checkpoint_info import (
    STATE_COMPLETED,
    CheckpointInfo,
    MetricHistory,
    best_of,
    searcher_settings,
    verify_checkpoint_dir,
)
from dataset_utils.errors import UserError
from trainer.run_store import TrialDir


class LocalCheckpointSource:
    """Checkpoints of one local trial folder (``runs/<experiment>/trial-<n>``)."""

    def __init__(self, trial_dir: str | Path) -> None:
        path = Path(trial_dir)
        if not (path / "trial.json").is_file():
            raise UserError(
                f"{path} is not a trial folder (no trial.json); expected "
                "runs/<experiment>/trial-<n>"
            )
        self.trial = TrialDir(path)
        cfg_file = self.trial.experiment_dir / "experiment.yaml"
        self.config: dict[str, Any] = (
            yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
        )

    def _infos(self) -> list[CheckpointInfo]:
        metric, smaller = searcher_settings(self.config)
        infos = []
        for e in self.trial.checkpoints():
            value = (e.get("metrics") or {}).get(metric)
            infos.append(
                CheckpointInfo(
                    uuid=e["uuid"],
                    experiment_id=0,
                    trial_id=self.trial.trial_id,
                    steps_completed=e.get("steps_completed"),
                    state=e.get("state", STATE_COMPLETED),
                    searcher_metric=metric,
                    metric_value=float(value) if value is not None else None,
                    smaller_is_better=smaller,
                    resources={k: int(v) for k, v in (e.get("resources") or {}).items()},
                    metadata=e,
                    hparams=self.config.get("hyperparameters") or {},
                    experiment_config=self.config,
                    report_time=e.get("report_time"),
                )
            )
        return infos

    def best_checkpoint(self) -> CheckpointInfo:
        infos = self._infos()
        best = best_of(infos)
        if best is None and infos:
            # No validation metric was reported (eval off): the latest checkpoint is the answer.
            best = max(infos, key=lambda i: i.steps_completed or 0)
        if best is None:
            raise UserError(f"{self.trial.path} has no complete checkpoint yet")
        return best

    def download(self, info: CheckpointInfo, dest: Path) -> Path:
        src = self.trial.checkpoint_path(info.uuid)
        verify_checkpoint_dir(src, info.resources)
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise UserError(f"download destination {dest} is not empty")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        verify_checkpoint_dir(dest, info.resources)
        return dest

    def local_path(self, info: CheckpointInfo) -> Path:
        """The checkpoint in place (verified), without copying."""
        src = self.trial.checkpoint_path(info.uuid)
        verify_checkpoint_dir(src, info.resources)
        return src

    def metric_history(self, info: CheckpointInfo) -> MetricHistory:
        return self.trial.metric_history()

    def describe(self) -> dict[str, str]:
        best = self.best_checkpoint()
        return {
            "determined.master": "local",
            "text2sql.trial_dir": str(self.trial.path.resolve()),
            "determined.experiment_name": str(self.config.get("name", "")),
            "determined.trial_id": str(self.trial.trial_id),
            "determined.checkpoint_uuid": best.uuid,
        }

    def wait_until_done(self, poll_s: float = 30.0, timeout_s: float | None = None) -> None:
        start = time.monotonic()
        while True:
            state = self.trial.info().get("state")
            if state == "COMPLETED":
                return
            if state == "ERRORED":
                raise UserError(f"trial {self.trial.path} errored")
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise UserError(f"trial {self.trial.path} still {state} after {timeout_s:.0f} s")
            time.sleep(poll_s)
