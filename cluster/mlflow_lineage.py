"""Where an MLflow run came from: its data, its code, its description and its Determined links.

What the MLflow 3.17 UI shows on a run page, and which call fills it:

- **Datasets used** (``MlflowClient.log_inputs``, the client form of ``mlflow.log_input``): one
  MLflow dataset per split -- ``train`` (context ``training``), ``valid`` (``validation``),
  ``test`` (``test``). A dataset is metadata only, the rows stay where they are: its *name* says
  which sources and which split (``spider+sql-create-context/test``), its *digest* is the data
  pipeline's cache key (``dataset_utils.pipeline.cache_key``: it hashes every source file or
  Hub fingerprint and every parameter of the split, and names the cache folder
  ``~/.cache/text2sql/datasets/<digest>`` that holds the split's rows), its *source* is the
  source file (``local``) or Hub id (``hugging_face``) -- a split drawn from several sources
  has a ``text2sql`` source listing each one with its row count -- and its *profile* holds the
  split's size (``{"num_rows": N}``). The evaluation runs (`cluster.mlflow_eval`) carry the
  same test dataset, so MLflow links training and evaluation to one dataset entry.
- **Source** and the git commit (``mlflow.source.name`` / ``mlflow.source.type`` /
  ``mlflow.source.git.commit`` / ``.branch`` / ``.repoURL``), plus ``text2sql.git.dirty``
  ("true" when the working tree had uncommitted changes) and ``text2sql.git.recorded_at``
  (``training``: read by the trainer and stored in the checkpoint's ``text2sql.json``;
  ``mirror``: the checkout that ran the mirror, for cluster checkpoints, whose context
  directory carries no ``.git``).
- **Description** (``mlflow.note.content``, rendered as Markdown): the experiment YAML's
  ``description``, then links to the Determined experiment and trial when the master is known.
- Determined links as tags too: ``determined.experiment_url`` (``<master>/det/experiments/<id>``),
  ``determined.trial_url`` (``<master>/det/trials/<id>``) beside ``determined.checkpoint_uuid``.

Everything here is idempotent: tags are overwritten with the same values, and MLflow stores a
(dataset name, digest) once per experiment and links it to a run once.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dataset_utils.redact import without_credentials

log = logging.getLogger(__name__)

SPLIT_CONTEXT = {"train": "training", "valid": "validation", "test": "test"}
DESCRIPTION_TAG = "mlflow.note.content"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The experiment type whose UI has "Training runs", "Evaluation runs" (base vs fine-tuned,
# per example) and the models with their metrics; "custom_model_development" has none of the
# evaluation views (see cluster.mlflow_eval).
EXPERIMENT_KIND = "genai_development"
CONTEXT_TAG = "mlflow.data.context"
# Columns of a split's rows (dataset_utils.records.Example), shown as the dataset's schema.
_EXAMPLE_COLUMNS = (
    ("question", True),
    ("context", True),
    ("sql", True),
    ("source", True),
    ("db_id", False),
    ("difficulty", False),
    ("complexity", False),
)


# ---- datasets ------------------------------------------------------------------------------


def data_name(report: Mapping[str, Any], formats: Sequence[str] = ()) -> str:
    """``spider+sql-create-context``: the source formats, in order (file stems if unknown)."""
    origins = list((report.get("sources") or {}).keys())
    names = list(formats) if len(formats) == len(origins) and formats else []
    if not names:
        names = [o.split(":", 1)[1] if o.startswith("hub:") else Path(o).stem for o in origins]
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return "+".join(seen) or "data"


def _source(report: Mapping[str, Any], formats: Sequence[str]) -> tuple[str, str]:
    """(source type, source JSON) of the split's origins."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    origins = dict(report.get("sources") or {})
    if len(origins) == 1:
        origin = next(iter(origins))
        if origin.startswith("hub:"):
            src = HuggingFaceDatasetSource(path=origin[len("hub:") :])
            return src._get_source_type(), src.to_json()
        # A file path resolves to MLflow's ``local`` source (the UI shows it as "Path: ...").
        with warnings.catch_warnings():  # "" and "file" schemes both claim a local path
            warnings.simplefilter("ignore", UserWarning)
            local = resolve_dataset_source(origin)
        return local._get_source_type(), local.to_json()
    fmts = list(formats) if len(formats) == len(origins) else [None] * len(origins)
    return "text2sql", json.dumps(
        {
            "sources": [
                {"format": f, "origin": o, "rows_loaded": n}
                for f, (o, n) in zip(fmts, origins.items(), strict=True)
            ]
        }
    )


def _schema_json() -> str:
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("string", name, required=req) for name, req in _EXAMPLE_COLUMNS])
    return json.dumps({"mlflow_colspec": schema.to_dict()})


def split_dataset(
    report: Mapping[str, Any],
    split: str,
    *,
    formats: Sequence[str] = (),
    rows: int | None = None,
) -> Any:
    """The MLflow dataset (``mlflow.entities.Dataset``) of one split of the prepared data.

    ``rows`` < the split's size names a prefix of it (``.../test[:120]``: what an evaluation
    with ``eval.test_samples`` judged).
    """
    from mlflow.entities import Dataset

    if split not in SPLIT_CONTEXT:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CONTEXT)}")
    size = int(report.get(f"n_{split}", 0))
    name = f"{data_name(report, formats)}/{split}"
    if rows is not None and rows < size:
        name, size = f"{name}[:{rows}]", rows
    source_type, source = _source(report, formats)
    return Dataset(
        name=name,
        digest=str(report.get("cache_key") or "unknown"),
        source_type=source_type,
        source=source,
        schema=_schema_json(),
        profile=json.dumps({"num_rows": size}),
    )


def dataset_inputs(report: Mapping[str, Any], formats: Sequence[str] = ()) -> list[Any]:
    """``DatasetInput``s for the train / valid / test splits (with their context tags)."""
    from mlflow.entities import DatasetInput, InputTag

    return [
        DatasetInput(
            dataset=split_dataset(report, split, formats=formats),
            tags=[InputTag(key=CONTEXT_TAG, value=context)],
        )
        for split, context in SPLIT_CONTEXT.items()
    ]


def source_formats(hparams: Mapping[str, Any] | Any) -> list[str]:
    """Formats of ``hyperparameters.data.sources`` (a dict or the parsed dataclass)."""
    data = hparams.get("data") if isinstance(hparams, Mapping) else getattr(hparams, "data", None)
    if data is None:
        return []
    sources = data.get("sources") if isinstance(data, Mapping) else getattr(data, "sources", [])
    out = []
    for s in sources or []:
        fmt = s.get("format") if isinstance(s, Mapping) else getattr(s, "format", None)
        out.append(str(fmt or "custom"))
    return out


# ---- code -----------------------------------------------------------------------------------


def git_state(path: str | Path | None = None) -> dict[str, str]:
    """``mlflow.source.git.*`` tags and ``text2sql.git.dirty`` for the checkout holding ``path``
    (default: this code). Empty when it is not a git checkout or git is not installed."""
    start = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        import git

        repo = git.Repo(start, search_parent_directories=True)
        out = {
            "mlflow.source.git.commit": repo.head.commit.hexsha,
            "text2sql.git.dirty": str(repo.is_dirty(untracked_files=True)).lower(),
        }
        if not repo.head.is_detached:
            out["mlflow.source.git.branch"] = repo.active_branch.name
        urls = [u for r in repo.remotes for u in r.urls]
        if urls:
            out["mlflow.source.git.repoURL"] = without_credentials(urls[0])
        return out
    except Exception as e:  # noqa: BLE001 - no git, no repository, no commit yet: no tags
        log.debug("no git state for %s: %s", start, e)
        return {}


def source_name(experiment_file: str | Path | None, fallback: str) -> str:
    """The experiment YAML relative to its git checkout (what a commit + path pins down)."""
    if not experiment_file:
        return fallback
    p = Path(experiment_file).resolve()
    try:
        import git

        root = Path(git.Repo(p.parent, search_parent_directories=True).working_tree_dir or "")
        return str(p.relative_to(root))
    except Exception:  # noqa: BLE001 - outside a checkout: the absolute path
        return str(p)


def code_provenance(experiment_file: str | Path | None = None) -> dict[str, Any]:
    """What the trainer records in each checkpoint's ``text2sql.json`` about its code."""
    return {
        "git": git_state(),
        "experiment_file": source_name(experiment_file, "") if experiment_file else None,
    }


# ---- Determined links and the description ---------------------------------------------------


def determined_links(links: Mapping[str, str]) -> dict[str, str]:
    """URL tags for a Determined experiment / trial (nothing for local trials)."""
    master = str(links.get("determined.master") or "")
    if not master.startswith(("http://", "https://")):
        return {}
    master = master.rstrip("/")
    out = {}
    if links.get("determined.experiment_id") not in (None, "", "0"):
        out["determined.experiment_url"] = (
            f"{master}/det/experiments/{links['determined.experiment_id']}"
        )
    if links.get("determined.trial_id") not in (None, "", "0"):
        out["determined.trial_url"] = f"{master}/det/trials/{links['determined.trial_id']}"
    return out


def run_description(text: str | None, links: Mapping[str, str]) -> str:
    """Markdown: the YAML's description, then where the checkpoint was trained."""
    lines = [str(text).strip()] if text and str(text).strip() else []
    urls = determined_links(links)
    parts = []
    if "determined.experiment_url" in urls:
        parts.append(
            f"[experiment {links['determined.experiment_id']}]({urls['determined.experiment_url']})"
        )
    if "determined.trial_url" in urls:
        parts.append(f"[trial {links['determined.trial_id']}]({urls['determined.trial_url']})")
    uuid = links.get("determined.checkpoint_uuid")
    if parts:
        parts += [f"checkpoint `{uuid}`"] if uuid else []
        lines.append("Determined: " + " · ".join(parts))
    elif uuid:
        where = links.get("text2sql.trial_dir")
        lines.append(f"Checkpoint `{uuid}`" + (f" of the local trial `{where}`" if where else ""))
    return "\n\n".join(lines)


def lineage_tags(
    *,
    description: str | None,
    links: Mapping[str, str],
    source: str,
    source_type: str = "LOCAL",
    git: Mapping[str, str] | None = None,
    git_recorded_at: str = "training",
) -> dict[str, str]:
    """All tags of a training / mirror run: description, source, git, Determined links."""
    tags = {"mlflow.source.name": source, "mlflow.source.type": source_type}
    if git:
        tags.update(git)
        tags["text2sql.git.recorded_at"] = git_recorded_at
    tags.update(determined_links(links))
    text = run_description(description, links)
    if text:
        tags[DESCRIPTION_TAG] = text
    return tags


def checkpoint_lineage_tags(
    config: Mapping[str, Any], links: Mapping[str, str], provenance: Mapping[str, Any] | None
) -> dict[str, str]:
    """`lineage_tags` of a checkpoint, from its manifest's ``provenance`` (see
    `code_provenance`): the live training run and the mirror run get the same ones."""
    provenance = provenance or {}
    git = dict(provenance.get("git") or {})
    recorded_at = "training"
    if not git:  # trained on a cluster: its context directory has no .git
        git, recorded_at = git_state(), "mirror"
    if provenance.get("experiment_file"):
        name, kind = str(provenance["experiment_file"]), "LOCAL"
    elif links.get("determined.experiment_id") not in (None, "", "0"):
        name = f"Determined experiment {links['determined.experiment_id']}"
        kind = "JOB"
    else:
        name, kind = str(config.get("name") or "text2sql"), "LOCAL"
    return lineage_tags(
        description=config.get("description"),
        links=links,
        source=name,
        source_type=kind,
        git=git,
        git_recorded_at=recorded_at,
    )


# ---- the experiment -------------------------------------------------------------------------


def ensure_experiment_kind(client: Any, experiment_id: str) -> str:
    """Mark the experiment as a GenAI one unless someone already chose its type.

    MLflow's UI picks the experiment's views by the ``mlflow.experimentKind`` tag; with none it
    guesses from what the experiment holds (runs but no traces: "machine learning", which has
    no "Evaluation runs" view) and writes its guess into the tag the first time someone opens
    the experiment. Returns the kind in force.
    """
    exp = client.get_experiment(experiment_id)
    kind = (exp.tags or {}).get(EXPERIMENT_KIND_TAG)
    if kind:
        if kind != EXPERIMENT_KIND:
            log.info(
                "experiment %s is of type %r: its evaluation runs are listed with the other runs "
                "(set the type to 'GenAI apps & agents' for the Evaluation runs view)",
                exp.name,
                kind,
            )
        return str(kind)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return EXPERIMENT_KIND


def link_model_version(client: Any, model_id: str, name: str, version: str) -> None:
    """Record on the LoggedModel which registered version it became, as a tracking server does
    on ``create_model_version`` (a local SQLite store does not): the UI's model list and model
    page then show the registered version. Idempotent."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    current = json.loads((model.tags or {}).get(MLFLOW_MODEL_VERSIONS) or "[]")
    # The server writes the version as a number.
    if any(e.get("name") == name and str(e.get("version")) == str(version) for e in current):
        return
    entry = {"name": name, "version": int(version) if str(version).isdigit() else version}
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(current + [entry])})
