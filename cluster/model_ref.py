"""Turn a ``--model`` reference into a loaded model, whatever kind of reference it is.

``text2sql ask``, ``text2sql evaluate --model`` and ``text2sql export`` accept:

- a checkpoint folder (it has ``text2sql.json``): local run store or downloaded from Determined;
- a local trial folder (``runs/<experiment>/trial-<n>``): its best checkpoint;
- an MLflow model URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``runs:/<run id>/model``), from ``$MLFLOW_TRACKING_URI`` or else the local store
  ``<runs>/mlflow.db`` that ``text2sql run`` writes;
- a folder written by ``text2sql export``, any HuggingFace model folder, or a Hub id.

Each becomes an `evaluation.answer.SqlAnswerer` (plus the `LoadedCheckpoint` when it was a
checkpoint, for base-model comparisons and export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.local_source import LocalCheckpointSource
from cluster.mlflow_tracking import default_tracking_uri
from dataset_utils.errors import UserError
from evaluation.answer import from_checkpoint, from_pretrained, read_export_spec, schema_style_of
from trainer.checkpoint import load_checkpoint, read_manifest
from trainer.config import Hyperparameters, from_dict

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class OpenedModel:
    answerer: Any  # evaluation.answer.SqlAnswerer
    kind: str  # checkpoint | mlflow | huggingface
    label: str
    loaded: Any = None  # evaluation.checkpoint_eval.LoadedCheckpoint for checkpoints
    trial_dir: Path | None = None  # the local trial the checkpoint belongs to, if known


def checkpoint_folder(ref: str | Path) -> tuple[Path, Path | None] | None:
    """``(checkpoint folder, trial folder or None)`` when ``ref`` is a checkpoint or a trial."""
    p = Path(ref).expanduser()
    if not p.is_dir():
        return None
    if (p / "trial.json").is_file():
        source = LocalCheckpointSource(p)
        return source.local_path(source.best_checkpoint()), p
    if (p / "text2sql.json").is_file():
        # runs/<experiment>/trial-<n>/checkpoints/<uuid>: the trial is two levels up.
        trial = p.parent.parent
        return p, trial if (trial / "trial.json").is_file() else None
    return None


def tracking_uri(runs_dir: str | Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the local store ``text2sql run`` writes (must exist)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return default_tracking_uri()
    runs = Path(runs_dir or os.environ.get("TEXT2SQL_RUNS", "runs"))
    if not (runs / "mlflow.db").is_file():
        raise UserError(
            f"no MLflow tracking store: MLFLOW_TRACKING_URI is not set and {runs / 'mlflow.db'} "
            "does not exist; set MLFLOW_TRACKING_URI (e.g. sqlite:///runs/mlflow.db) or --runs-dir"
        )
    return default_tracking_uri(runs)  # the store `text2sql run` writes there


def schema_style_hint(ref: str) -> str | None:
    """The schema style ``ref`` was trained with, read without loading weights (None: only
    known once loaded, e.g. an MLflow model)."""
    found = checkpoint_folder(ref)
    if found is not None:
        try:
            hp = from_dict(Hyperparameters, read_manifest(found[0])["hyperparameters"])
        except UserError:
            return None  # open_model reports the damage
        return schema_style_of(hp)
    if ref.startswith(MLFLOW_SCHEMES):
        return None

    folder = Path(ref).expanduser()
    spec = read_export_spec(folder) if folder.is_dir() else None
    return str(spec.get("schema_style", "ddl")) if spec else "ddl"


def open_model(ref: str, *, runs_dir: str | Path | None = None) -> OpenedModel:
    """Load ``ref`` (see the module docstring)."""
    found = checkpoint_folder(ref)
    if found is not None:
        ckpt, trial = found
        loaded = load_checkpoint(ckpt)
        return OpenedModel(from_checkpoint(loaded), "checkpoint", ckpt.name, loaded, trial)
    if ref.startswith(MLFLOW_SCHEMES):
        return OpenedModel(_mlflow_answerer(ref, runs_dir), "mlflow", ref)
    return OpenedModel(from_pretrained(ref), "huggingface", Path(ref).name or ref)


def _mlflow_answerer(ref: str, runs_dir: str | Path | None) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(runs_dir)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(ref)
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"MLflow model {ref} could not be loaded from {uri}: {first}") from None
    inner = model.unwrap_python_model()
    answerer = getattr(inner, "answerer", None)
    if answerer is None:
        raise UserError(f"MLflow model {ref} is not a text2sql model (no answerer)")
    return answerer
