"""Base vs fine-tuned in MLflow's own evaluation views, judged by our execution judge.

Which API fills which view of the MLflow 3.17.2 UI (read from its Python source and the UI
bundle it serves), and why this module uses ``mlflow.genai.evaluate``:

- ``mlflow.genai.evaluate(data, scorers, model_id=...)`` makes the run an evaluation run
  (``mlflow.runType = genai_evaluate``), writes one trace per example -- request = the inputs,
  response = the model's output -- with each scorer's verdict attached as an assessment and
  the gold answer as an expectation, logs the aggregated ``<scorer>/mean`` metrics to the run
  *and*, given ``model_id``, to that LoggedModel, and records the dataset and the model as the
  run's inputs. In a GenAI experiment (``mlflow.experimentKind = genai_development``, set by
  `cluster.mlflow_lineage.ensure_experiment_kind`) the UI lists every run without a model
  output under **Evaluation runs**; ticking two of them and pressing **Compare** shows the two
  models' answers and verdicts side by side, row by row (traces matched by request), and each
  run's page lists its examples with their assessments. The run that logged the model appears
  under **Training runs**, the models with their metrics under **Agent versions** (Models).
- ``mlflow.models.evaluate`` (the classic API) logs metrics and an ``eval_results_table.json``;
  the UI shows such tables only in the classic Runs page's "Artifact evaluation" mode, which a
  GenAI experiment does not offer, without verdicts per example and without the comparison.

So each model (``base``, ``fine-tuned``) gets its own evaluation run through
``mlflow.genai.evaluate`` with our judge as the scorers (``execution_accuracy``,
``exact_match``, ``executable``, ``valid_sql``; an unjudgeable example has no
``execution_accuracy`` value, so its mean is correct / judgeable exactly as in our report, and
the judge's error is each verdict's rationale). It is a *static-dataset* evaluation: the
outputs are the SQL the judge already scored, there is no ``predict_fn``, and the scorers look
the verdicts up instead of running SQL again -- seconds per hundred examples, no generation.

Also logged into each evaluation run: the per-example table (``eval_results_table.json``:
question, gold, prediction, verdict, error, ...), and the judge's own figures
(`evaluation.judge.EvalResult.flat_metrics`: BLEU, counts, per difficulty and per source) with
``model_id``, so the registered version's LoggedModel carries its execution accuracy. The base
model is an external LoggedModel (``base: <model>``, one per experiment and base model), so
both models sit in the same model list with comparable metrics.

The evaluation runs are deliberately *not* nested under the training run: the Evaluation runs
list hides a child run whose parent is not listed there too. The link is the tag
``text2sql.training_run_id`` and a link in each run's description.

Idempotent: an evaluation run is found again by its tags (checkpoint UUID + model label); a
FINISHED one is kept, one left unfinished by a crash is deleted and redone. Runs are marked
FINISHED only after every example's trace is back from the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.mlflow_tracking import env_var
from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.redact import tracking_params
from evaluation.judge import EvalResult, Judgement

log = logging.getLogger(__name__)

TAG_OF = "text2sql.evaluation.checkpoint_uuid"
TAG_MODEL = "text2sql.evaluation.model"
TAG_TRAINING_RUN = "text2sql.training_run_id"
TAG_BASE_MODEL = "text2sql.base_model"
SCORERS = ("execution_accuracy", "exact_match", "executable", "valid_sql")
TABLE = "eval_results_table.json"


@dataclass
class EvaluationRun:
    label: str
    run_id: str
    model_id: str | None
    metrics: dict[str, float]
    reused: bool


def _verdict(j: Judgement) -> str:
    return "unjudgeable" if j.exec_correct is None else ("correct" if j.exec_correct else "wrong")


def _key(question: str, context: str, gold: str, prediction: str) -> tuple[str, str, str, str]:
    return (question, context, gold, prediction or "")


def eval_frame(examples: Sequence[Example], result: EvalResult) -> Any:
    """The static evaluation set: inputs, the judged outputs, the gold SQL, tags per row."""
    import pandas as pd

    rows = []
    for i, (e, j) in enumerate(zip(examples, result.judgements, strict=True)):
        rows.append(
            {
                "inputs": {"question": e.question, "context": e.context},
                "outputs": j.pred_sql or "",
                "expectations": {"expected_response": e.sql},
                "tags": {
                    "example": str(i),
                    "verdict": _verdict(j),
                    "source": e.source,
                    **({"db_id": e.db_id} if e.db_id else {}),
                    **({"difficulty": e.difficulty} if e.difficulty else {}),
                },
            }
        )
    return pd.DataFrame(rows)


def results_table(examples: Sequence[Example], result: EvalResult) -> dict[str, list[Any]]:
    """Per-example table, column-wise (``mlflow.log_table``)."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "example",
            "question",
            "gold",
            "prediction",
            "verdict",
            "exact_match",
            "executable",
            "valid_sql",
            "error",
            "db_id",
            "difficulty",
            "source",
        )
    }
    for i, (e, j) in enumerate(zip(examples, result.judgements, strict=True)):
        for k, v in (
            ("example", i),
            ("question", e.question),
            ("gold", e.sql),
            ("prediction", j.pred_sql or ""),
            ("verdict", _verdict(j)),
            ("exact_match", j.exact_match),
            ("executable", j.executable),
            ("valid_sql", j.valid_sql),
            ("error", j.error or ""),
            ("db_id", e.db_id or ""),
            ("difficulty", e.difficulty or ""),
            ("source", e.source),
        ):
            cols[k].append(v)
    return cols


def judge_scorers(examples: Sequence[Example], result: EvalResult) -> list[Any]:
    """Our judge's verdicts as MLflow scorers (looked up, not recomputed)."""
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    verdicts: dict[tuple[str, str, str, str], Judgement] = {}
    for e, j in zip(examples, result.judgements, strict=True):
        verdicts[_key(e.question, e.context, e.sql, j.pred_sql)] = j

    def lookup(inputs: dict[str, Any], outputs: Any, expectations: dict[str, Any]) -> Judgement:
        key = _key(
            str(inputs.get("question", "")),
            str(inputs.get("context", "")),
            str((expectations or {}).get("expected_response", "")),
            str(outputs or ""),
        )
        if key not in verdicts:
            raise KeyError(f"no verdict of the judge for question {key[0][:80]!r}")
        return verdicts[key]

    @scorer(name="execution_accuracy")
    def execution_accuracy(inputs: Any, outputs: Any, expectations: Any) -> Any:
        j = lookup(inputs, outputs, expectations)
        if j.exec_correct is None:
            why = j.unjudgeable_reason or j.error or "the gold query cannot be judged"
            return Feedback(value=None, rationale=f"unjudgeable: {why}")
        return Feedback(
            value=bool(j.exec_correct),
            rationale=(
                f"same rows as the gold query ({j.method})"
                if j.exec_correct
                else (j.error or "different rows from the gold query")
            ),
        )

    @scorer(name="exact_match")
    def exact_match(inputs: Any, outputs: Any, expectations: Any) -> Any:
        return bool(lookup(inputs, outputs, expectations).exact_match)

    @scorer(name="executable")
    def executable(inputs: Any, outputs: Any, expectations: Any) -> Any:
        j = lookup(inputs, outputs, expectations)
        return Feedback(value=bool(j.executable), rationale=None if j.executable else j.error)

    @scorer(name="valid_sql")
    def valid_sql(inputs: Any, outputs: Any, expectations: Any) -> Any:
        return bool(lookup(inputs, outputs, expectations).valid_sql)

    return [execution_accuracy, exact_match, executable, valid_sql]


def with_dataset_identity(frame: Any, dataset: Any) -> Any:
    """Make ``mlflow.genai.evaluate`` record ``dataset`` (name, digest = our data pipeline's
    cache key, source, size) as the evaluation's input instead of an anonymous ``dataset``.

    This is the hand-off MLflow 3.17 itself uses for DataFrames of its managed evaluation
    datasets (``EvaluationDataset.to_df``); with any other MLflow it is ignored and MLflow names
    the input ``dataset`` (the test in tests/test_mlflow_tracking.py notices).
    """
    try:
        from mlflow.genai.datasets.evaluation_dataset import compute_records_sha256
        from mlflow.utils.mlflow_tags import MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY
    except ImportError:  # another MLflow: an anonymous dataset, nothing else changes
        return frame
    frame.attrs[MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY] = {
        "name": dataset.name,
        "digest": dataset.digest,
        "source_type": dataset.source_type,
        "source": dataset.source,
        "schema": dataset.schema,
        "profile": dataset.profile,
        "records_sha256": compute_records_sha256(frame),
    }
    return frame


@contextlib.contextmanager
def _eval_workers(tracking_uri: str) -> Iterator[None]:
    """One writer thread for a SQLite store (concurrent trace writes to one SQLite file lost
    traces in MLflow 3.17.2: "Trace ... not found"), MLflow's default for a server."""
    key = "MLFLOW_GENAI_EVAL_MAX_WORKERS"
    if tracking_uri.startswith("sqlite:") and key not in os.environ:
        with env_var(key, "1"):
            yield
    else:
        yield


def run_traces(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    """Every trace of an evaluation run (follows the pages)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment_id], run_id=run_id, max_results=500, page_token=token
        )
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def find_evaluation_runs(client: Any, experiment_id: str, uuid: str) -> dict[str, Any]:
    """Evaluation runs of checkpoint ``uuid``, by model label (deleted ones excluded)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_OF}` = '{uuid}'")
    return {r.data.tags.get(TAG_MODEL, ""): r for r in runs}


def base_model_id(client: Any, experiment_id: str, base_name: str, params: dict[str, str]) -> str:
    """The external LoggedModel standing for the base model (created once per experiment)."""
    import mlflow

    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_BASE_MODEL}` = '{_quote(base_name)}'",
        max_results=1,
    )
    if found:
        return str(found[0].model_id)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", base_name.split("/")[-1].split(":")[-1]).strip("-")
    model = mlflow.create_external_model(
        name=f"base-{slug or 'model'}"[:100],
        experiment_id=experiment_id,
        tags={TAG_BASE_MODEL: base_name},
        params=params,
        model_type="base model",
    )
    return str(model.model_id)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def log_evaluations(
    client: Any,
    *,
    tracking_uri: str,
    experiment_id: str,
    training_run_id: str,
    uuid: str,
    examples: Sequence[Example],
    results: Mapping[str, EvalResult],
    dataset: Any,
    model_ids: Mapping[str, str | None],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    base_name: str | None = None,
) -> dict[str, EvaluationRun]:
    """One MLflow evaluation run per model label in ``results`` (see the module docstring).

    ``model_ids`` maps a label to its LoggedModel id; a ``base`` label without one gets the
    external base LoggedModel (``base_name``). ``dataset`` is the evaluated test split
    (`cluster.mlflow_lineage.split_dataset`). Safe to call again: finished runs are reused.
    """
    import mlflow

    if not examples:
        return {}
    mlflow.set_tracking_uri(tracking_uri)
    existing = find_evaluation_runs(client, experiment_id, uuid)
    out: dict[str, EvaluationRun] = {}
    for label, result in results.items():
        run = existing.get(label)
        if run is not None and run.info.status == "FINISHED":
            out[label] = EvaluationRun(
                label,
                run.info.run_id,
                run.data.tags.get("text2sql.evaluation.model_id"),
                dict(run.data.metrics),
                reused=True,
            )
            continue
        if run is not None:  # left unfinished (the process died): start again
            client.delete_run(run.info.run_id)
        model_id = model_ids.get(label)
        if model_id is None and label == "base" and base_name:
            model_id = base_model_id(client, experiment_id, base_name, {"name_or_path": base_name})
        out[label] = _evaluate_one(
            client,
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            training_run_id=training_run_id,
            uuid=uuid,
            label=label,
            examples=examples,
            result=result,
            dataset=dataset,
            model_id=model_id,
            params={k: str(v) for k, v in ((params or {}).get(label) or {}).items()},
        )
    return out


def _evaluate_one(
    client: Any,
    *,
    tracking_uri: str,
    experiment_id: str,
    training_run_id: str,
    uuid: str,
    label: str,
    examples: Sequence[Example],
    result: EvalResult,
    dataset: Any,
    model_id: str | None,
    params: dict[str, str],
) -> EvaluationRun:
    import mlflow

    tags = {
        TAG_OF: uuid,
        TAG_MODEL: label,
        TAG_TRAINING_RUN: training_run_id,
        "mlflow.note.content": (
            f"**{label}** on {dataset.name} ({len(examples)} examples), judged by execution "
            f"in the read-only SQLite sandbox; checkpoint `{uuid}`, "
            f"[training run](#/experiments/{experiment_id}/runs/{training_run_id})."
        ),
    }
    if model_id:
        tags["text2sql.evaluation.model_id"] = model_id
    run = client.create_run(experiment_id, run_name=f"{label}-{uuid[:8]}", tags=tags)
    run_id = run.info.run_id
    frame = with_dataset_identity(eval_frame(examples, result), dataset)
    with _eval_workers(tracking_uri), mlflow.start_run(run_id=run_id, nested=False) as active:
        if params:
            mlflow.log_params(tracking_params(params))
        outcome = mlflow.genai.evaluate(
            data=frame, scorers=judge_scorers(examples, result), model_id=model_id
        )
        judge = result.flat_metrics()
        # The judge's own figures (BLEU, counts, groups), on the run and on the model.
        mlflow.log_metrics(judge, model_id=model_id, dataset=dataset)
        mlflow.log_table(results_table(examples, result), artifact_file=TABLE)
        traces = run_traces(client, experiment_id, active.info.run_id)
        if len(traces) != len(examples):
            raise UserError(
                f"MLflow evaluation of the {label} model stored {len(traces)} of "
                f"{len(examples)} examples (run {run_id}); run the same command again"
            )
    client.set_terminated(run_id, "FINISHED")
    metrics = {**{k: float(v) for k, v in outcome.metrics.items()}, **judge}
    log.info("MLflow evaluation run %s (%s): %s", run_id, label, json.dumps(metrics)[:300])
    return EvaluationRun(label, run_id, model_id, metrics, reused=False)
