"""Best checkpoint -> verify -> evaluate vs base -> MLflow run, model, registered version.

One flow for both sources of checkpoints (`CheckpointSource`): a Determined experiment
(``text2sql mirror --experiment-id 42``) or a local trial folder
(``text2sql mirror --trial-dir runs/<x>/trial-1``; ``text2sql run`` calls it after training).

Idempotent: the MLflow run carries the checkpoint UUID as a tag and records each finished stage
(``text2sql.stage.*`` tags); re-running for the same checkpoint skips what is done and never
creates a second run or model version. Every MLflow call is retried with exponential backoff;
when the tracking server stays down, one clear error says so and a re-run finishes the job.

The model is logged only after its round trip is verified: ``mlflow.pyfunc.load_model`` on the
logged model must reproduce the in-memory model's SQL exactly on held-out prompts, decoded
the same way (the checkpoint's ``eval.decoding``, or ``decoding`` overrides; recorded in the
report, the run's params ``decoding.*``, the model's metadata and its ``text2sql_model.json``).
The round trip feeds both sides what a client sends (question + schema): with execution
guidance, the evaluation itself runs candidates on a Spider row's real database, which the
served model does not have (it uses an empty database built from the schema).

What MLflow's UI then shows besides params and metrics -- datasets, description, source and git
commit, Determined links (`cluster.mlflow_lineage`), base vs fine-tuned evaluation runs and the
metrics on the logged model (`cluster.mlflow_eval`) -- is logged by those two modules.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.checkpoint_info import verify_checkpoint_dir
from cluster.local_source import LocalCheckpointSource
from cluster.mlflow_eval import log_evaluations
from cluster.mlflow_lineage import (
    checkpoint_lineage_tags,
    dataset_inputs,
    ensure_experiment_kind,
    link_model_version,
    source_formats,
    split_dataset,
)
from cluster.mlflow_model import (
    Text2SqlModel,
    build_model_dir,
    code_paths,
    pip_requirements,
    signature,
)
from cluster.mlflow_tracking import (
    artifact_location,
    configure_quiet_mlflow_http,
    create_once,
    default_tracking_uri,
    with_retries,
)
from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.redact import tracking_params
from evaluation.checkpoint_eval import (
    CheckpointEvaluation,
    evaluate_checkpoint,
    report_dir_for,
)
from evaluation.generation import generate_sql
from evaluation.report import describe_decoding, log_report_to_mlflow
from trainer.checkpoint import read_manifest

log = logging.getLogger(__name__)

TAG_UUID = "text2sql.checkpoint_uuid"
STAGES = ("params", "history", "evaluation", "model", "registered")


@dataclass
class MirrorResult:
    run_id: str
    model_uri: str | None
    version: str | None
    champion: bool
    tracking_uri: str
    skipped: bool
    summary: str = ""


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    exp = with_retries(
        lambda: client.get_experiment_by_name(name), "looking up the experiment", tracking_uri
    )
    if exp is not None:
        return str(exp.experiment_id)

    def find() -> str | None:
        found = client.get_experiment_by_name(name)
        return str(found.experiment_id) if found is not None else None

    return create_once(
        lambda: str(
            client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
        ),
        find,
        "creating the experiment",
        tracking_uri,
    )


def _runs_for(client: Any, experiment_id: str, uuid: str) -> list[Any]:
    return list(
        client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_UUID}` = '{uuid}'", max_results=5
        )
    )


def find_run(client: Any, experiment_id: str, uuid: str, tracking_uri: str) -> Any:
    runs = with_retries(
        lambda: _runs_for(client, experiment_id, uuid), "searching runs", tracking_uri
    )
    return runs[0] if runs else None


def ensure_run(client: Any, experiment_id: str, uuid: str, run_name: str, tracking_uri: str) -> Any:
    """The experiment's run for checkpoint ``uuid`` (tag `TAG_UUID`), created once."""
    run = find_run(client, experiment_id, uuid, tracking_uri)
    if run is not None:
        return run

    def find() -> Any:
        runs = _runs_for(client, experiment_id, uuid)
        return runs[0] if runs else None

    return create_once(
        lambda: client.create_run(experiment_id, run_name=run_name, tags={TAG_UUID: uuid}),
        find,
        "creating the run",
        tracking_uri,
    )


def mirror(
    source: Any,
    *,
    tracking_uri: str,
    experiment_name: str,
    registered_model_name: str,
    work_dir: Path | None = None,
    alias: str = "champion",
    roundtrip_prompts: int = 20,
    test_samples: int | None = None,
    reuse_run_id: str | None = None,
    progress: bool = True,
    decoding: dict[str, Any] | None = None,
    report_root: Path | None = None,
    evaluation: CheckpointEvaluation | None = None,
) -> MirrorResult:
    """Mirror ``source``'s best checkpoint into MLflow (see the module docstring).

    ``decoding``: overrides of the checkpoint's ``eval.decoding`` (``{"num_beams": 4}``), for
    the evaluation and the served model alike. ``evaluation``: the evaluation stage's result
    for this checkpoint (``text2sql run`` evaluates before mirroring), logged as it is instead
    of evaluating again. Otherwise the report is written to
    ``<report_root or work_dir>/evaluation-<uuid8>/``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    info = source.best_checkpoint()
    links = source.describe()
    client = MlflowClient(tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    exp_id = ensure_experiment(client, experiment_name, tracking_uri)
    with_retries(
        lambda: ensure_experiment_kind(client, exp_id), "setting the experiment type", tracking_uri
    )

    run = find_run(client, exp_id, info.uuid, tracking_uri)
    if run is None and reuse_run_id:
        try:
            run = client.get_run(reuse_run_id)
            # The live training run is reused only inside the experiment we mirror into (a
            # mirror under another --name must get its own run) and only for this checkpoint.
            other_experiment = str(run.info.experiment_id) != exp_id
            if other_experiment or run.data.tags.get(TAG_UUID) not in (None, info.uuid):
                run = None
        except Exception:  # noqa: BLE001 - the live run may live on another server
            run = None
    if run is not None and run.data.tags.get("text2sql.stage.registered"):
        version = run.data.tags["text2sql.stage.registered"]
        print(
            f"checkpoint {info.uuid} is already mirrored: run {run.info.run_id}, "
            f"model {registered_model_name} version {version}; nothing to do"
        )
        return MirrorResult(
            run.info.run_id,
            run.data.tags.get("text2sql.model_uri"),
            version,
            False,
            tracking_uri,
            skipped=True,
        )
    # ---- fetch + verify, before anything is written to MLflow ------------------------------
    # A missing or truncated checkpoint must not leave a half-made run behind.
    work = Path(work_dir or tempfile.mkdtemp(prefix="text2sql-mirror-"))
    if hasattr(source, "local_path"):
        ckpt_dir = source.local_path(info)
    else:
        ckpt_dir = work / "checkpoint" / info.uuid
        if not _complete_download(ckpt_dir, info.resources):
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a partial copy from an earlier try
            ckpt_dir.mkdir(parents=True)
            source.download(info, ckpt_dir)

    if run is None:
        run = ensure_run(
            client,
            exp_id,
            info.uuid,
            f"{experiment_name}-trial{info.trial_id}-{info.uuid[:8]}",
            tracking_uri,
        )
    run_id = run.info.run_id
    done = {s for s in STAGES if run.data.tags.get(f"text2sql.stage.{s}")}

    def mark(stage: str, value: str = "true") -> None:
        with_retries(
            lambda: client.set_tag(run_id, f"text2sql.stage.{stage}", value),
            f"recording stage {stage}",
            tracking_uri,
        )

    # ---- tags + params + datasets ---------------------------------------------------------
    manifest = read_manifest(ckpt_dir)
    data_report = manifest.get("data_report") or {}
    formats = source_formats(info.hparams)
    tags = {
        TAG_UUID: info.uuid,
        **{k: str(v) for k, v in links.items()},
        "determined.steps_completed": str(info.steps_completed),
        # Description, source + git commit, Determined links (cluster/mlflow_lineage.py).
        **checkpoint_lineage_tags(info.experiment_config or {}, links, manifest.get("provenance")),
    }
    with_retries(
        lambda: [client.set_tag(run_id, k, v) for k, v in tags.items()],
        "tagging the run",
        tracking_uri,
    )
    if data_report:
        with_retries(
            lambda: client.log_inputs(run_id, datasets=dataset_inputs(data_report, formats)),
            "logging the datasets",
            tracking_uri,
        )
    if "params" not in done:
        # Flattened and scrubbed (credentials -> ***) by the one helper every param goes through.
        params = tracking_params(info.hparams)
        cfg = {k: v for k, v in (info.experiment_config or {}).items() if k != "hyperparameters"}
        params.update(tracking_params(cfg, "config"))
        existing = set(run.data.params)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            batch = items[i : i + 100]
            with_retries(
                lambda b=batch: client.log_batch(run_id, params=b), "logging params", tracking_uri
            )
        mark("params")

    # ---- metric history with steps ------------------------------------------------------
    if "history" not in done:
        from mlflow.entities import Metric

        history = source.metric_history(info)
        logged_live = run.data.tags.get("text2sql.source") == "local" and reuse_run_id == run_id
        if not logged_live:
            now = int(time.time() * 1000)
            metrics = [
                Metric(
                    k
                    if group == "validation" or k.startswith("train")
                    else f"train_{k}"
                    if k in ("loss", "grad_norm", "learning_rate")
                    else k,
                    float(v),
                    now,
                    int(step),
                )
                for group, rows in history.items()
                for step, values in rows
                for k, v in values.items()
                if isinstance(v, (int, float))
            ]
            for i in range(0, len(metrics), 500):
                batch = metrics[i : i + 500]
                with_retries(
                    lambda b=batch: client.log_batch(run_id, metrics=b),
                    "logging the metric history",
                    tracking_uri,
                )
        mark("history")

    # ---- evaluate (unless the caller's evaluation stage already did, for this checkpoint) ----
    if evaluation is None or evaluation.checkpoint.resolve() != Path(ckpt_dir).resolve():
        evaluation = evaluate_checkpoint(
            ckpt_dir,
            report_dir_for(report_root or work, info.uuid),
            title=f"{experiment_name}: checkpoint {info.uuid[:8]} vs base model",
            history=source.metric_history(info),
            curves_title=f"{experiment_name}: trial {info.trial_id}",
            test_samples=test_samples,
            decoding=decoding,
            progress=progress,
        )
    loaded, examples, comparison = evaluation.loaded, evaluation.examples, evaluation.comparison
    paths, curves, table = evaluation.paths, evaluation.curves, evaluation.table
    ft = comparison.results["fine-tuned"].overall
    if "evaluation" not in done:

        def log_eval() -> None:
            with mlflow.start_run(run_id=run_id):
                log_report_to_mlflow(paths, comparison.results)
                have = set(client.get_run(run_id).data.params)
                new = {
                    k: v
                    for k, v in tracking_params(comparison.decoding, "decoding").items()
                    if k not in have
                }
                if new:
                    mlflow.log_params(new)
                if curves is not None:
                    mlflow.log_artifact(str(curves), artifact_path="evaluation")

        with_retries(log_eval, "logging the evaluation report", tracking_uri)
        mark("evaluation")

    # ---- model: stage, verify the round trip, log -----------------------------------------
    n_rt = min(roundtrip_prompts, len(examples))
    rt_examples = examples[:n_rt]

    # What a client sends: question + schema (no database path, no gold).
    requests = [Example(e.question, e.context, "", "serving") for e in rt_examples]
    in_memory = generate_sql(
        loaded.model,
        loaded.tokenizer,
        requests,
        loaded.plan,
        batch_size=loaded.hp.eval.batch_size,
        max_new_tokens=loaded.hp.eval.max_new_tokens,
        progress=False,
        timeout_s=loaded.hp.eval.timeout_s,
        **comparison.decoding,
    ).sql
    model_uri = run.data.tags.get("text2sql.model_uri")
    if "model" not in done or not model_uri:
        staging = work / "model-staging"
        artifacts = build_model_dir(loaded, staging, decoding=comparison.decoding)
        import pandas as pd

        sample = pd.DataFrame(
            [{"question": e.question, "context": e.context} for e in rt_examples[:2]]
        )

        def log_model() -> str:
            with mlflow.start_run(run_id=run_id):
                info_ = mlflow.pyfunc.log_model(
                    # The LoggedModel's name in the experiment's model list, beside the
                    # evaluation run of the same name and the base model (cluster/mlflow_eval.py).
                    name=f"fine-tuned-{info.uuid[:8]}",
                    python_model=Text2SqlModel(),
                    artifacts=artifacts,
                    code_paths=code_paths(),
                    signature=signature(),
                    pip_requirements=pip_requirements(),
                    input_example=sample,
                    metadata={
                        "checkpoint_uuid": info.uuid,
                        "base_model": loaded.hp.model.name_or_path,
                        "method": loaded.hp.method,
                        "decoding": comparison.decoding,
                    },
                )
                return str(info_.model_uri)

        model_uri = with_retries(log_model, "logging the model", tracking_uri)
        with_retries(
            lambda: client.set_tag(run_id, "text2sql.model_uri", model_uri),
            "tagging the model uri",
            tracking_uri,
        )
        mark("model")
    loaded_back = with_retries(
        lambda: mlflow.pyfunc.load_model(model_uri), "loading the model back", tracking_uri
    )
    import pandas as pd

    frame = pd.DataFrame([{"question": e.question, "context": e.context} for e in rt_examples])
    served = list(
        loaded_back.predict(frame, params={"max_new_tokens": loaded.hp.eval.max_new_tokens})["sql"]
    )
    mismatches = [i for i, (a, b) in enumerate(zip(in_memory, served, strict=True)) if a != b]
    with_retries(
        lambda: client.log_metric(
            run_id, "roundtrip_identical", float(n_rt - len(mismatches)) / max(1, n_rt)
        ),
        "logging the round-trip check",
        tracking_uri,
    )
    if mismatches:
        i = mismatches[0]
        raise UserError(
            f"round trip failed: the model loaded back from MLflow differs from the in-memory "
            f"model on {len(mismatches)}/{n_rt} prompts (first: {in_memory[i]!r} vs "
            f"{served[i]!r}); not registering it"
        )
    print(
        f"round trip verified: pyfunc model reproduces the in-memory SQL "
        f"({describe_decoding(comparison.decoding)}) on {n_rt}/{n_rt} held-out prompts"
    )

    # ---- MLflow evaluation runs: base and fine-tuned, judged by our judge -----------------
    decoding = {
        "decoding": describe_decoding(comparison.decoding),
        "max_new_tokens": loaded.hp.eval.max_new_tokens,
    }
    evaluations = with_retries(
        lambda: log_evaluations(
            client,
            tracking_uri=tracking_uri,
            experiment_id=exp_id,
            training_run_id=run_id,
            uuid=info.uuid,
            examples=examples,
            results=comparison.results,
            dataset=split_dataset(data_report, "test", formats=formats, rows=len(examples)),
            model_ids={"fine-tuned": model_uri.split("/", 1)[1]}
            if model_uri.startswith("models:/m-")
            else {},
            params={
                "base": {"model": loaded.hp.model.name_or_path, **decoding},
                "fine-tuned": {
                    "model": f"{loaded.hp.model.name_or_path} + {loaded.hp.method}",
                    "checkpoint": info.uuid,
                    **decoding,
                },
            },
            base_name=loaded.hp.model.name_or_path,
        ),
        "logging the MLflow evaluation runs",
        tracking_uri,
    )

    # ---- register + champion alias ------------------------------------------------------
    version = _register(
        client, registered_model_name, model_uri, run_id, info.uuid, ft.exec_accuracy, tracking_uri
    )
    if model_uri.startswith("models:/m-"):
        with_retries(
            lambda: link_model_version(
                client, model_uri.split("/", 1)[1], registered_model_name, version
            ),
            "linking the model to its registered version",
            tracking_uri,
        )
    champion = _maybe_promote(
        client, registered_model_name, version, ft.exec_accuracy, alias, tracking_uri
    )
    mark("registered", version)
    with_retries(lambda: client.set_terminated(run_id, "FINISHED"), "closing the run", tracking_uri)
    summary = (
        f"\n{table}\n\nreport: {paths['markdown']}\nchart:  {paths['png']}\n"
        + (f"curves: {curves}\n" if curves is not None else "")
        + f"MLflow: run {run_id}, model {registered_model_name} version {version}"
        + (f" (alias '{alias}')" if champion else "")
        + "\nMLflow evaluation runs: "
        + ", ".join(f"{e.label} {e.run_id}" for e in evaluations.values())
    )
    return MirrorResult(
        run_id, model_uri, version, champion, tracking_uri, skipped=False, summary=summary
    )


def _complete_download(path: Path, resources: dict[str, int]) -> bool:
    """An earlier run's download of this checkpoint, every recorded file there at its size."""

    if not resources or not path.is_dir():
        return False
    try:
        verify_checkpoint_dir(path, resources)
    except UserError:
        return False
    return True


def _register(
    client: Any, name: str, model_uri: str, run_id: str, uuid: str, score: float, tracking_uri: str
) -> str:
    from mlflow.exceptions import MlflowException

    try:
        with_retries(
            lambda: client.create_registered_model(name), "registering the model name", tracking_uri
        )
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise

    def find() -> str | None:
        for v in client.search_model_versions(f"name='{name}'"):
            if (v.tags or {}).get(TAG_UUID) == uuid:
                return str(v.version)
        return None

    version = with_retries(find, "listing model versions", tracking_uri)
    if version is not None:
        return version
    return create_once(
        lambda: str(
            client.create_model_version(
                name,
                model_uri,
                run_id=run_id,
                tags={TAG_UUID: uuid, "execution_accuracy": f"{score:.6f}"},
                # A tracking *server* (unlike a local store) refuses a `models:/m-...` source
                # unless the logged model's id is given with it (MLflow 3.17
                # INVALID_PARAMETER_VALUE).
                model_id=(
                    model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
                ),
            ).version
        ),
        find,
        "creating the model version",
        tracking_uri,
    )


def _maybe_promote(
    client: Any, name: str, version: str, score: float, alias: str, tracking_uri: str
) -> bool:
    """Move ``alias`` to ``version`` only if it beats the current holder."""
    from mlflow.exceptions import MlflowException

    try:
        current = with_retries(
            lambda: client.get_model_version_by_alias(name, alias),
            "reading the champion",
            tracking_uri,
        )
    except MlflowException:
        current = None
    if current is not None:
        if str(current.version) == version:
            return True
        best = float((current.tags or {}).get("execution_accuracy", "-1"))
        if score <= best:
            print(
                f"version {version} ({100 * score:.1f}%) does not beat '{alias}' version "
                f"{current.version} ({100 * best:.1f}%): alias unchanged"
            )
            return False
    with_retries(
        lambda: client.set_registered_model_alias(name, alias, version),
        "moving the champion alias",
        tracking_uri,
    )
    return True


def mirror_local_trial(
    trial_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    registered_model_name: str | None = None,
    progress: bool = True,
    decoding: dict[str, Any] | None = None,
    evaluation: CheckpointEvaluation | None = None,
) -> MirrorResult:
    """Mirror a local trial (the last stage of ``text2sql run``, which passes its evaluation).

    Names default to the YAML's ``mlflow`` block, else the experiment name. The evaluation
    report lives in the trial folder, ``<trial>/evaluation-<uuid8>/``, with or without MLflow.
    """

    configure_quiet_mlflow_http()
    source = LocalCheckpointSource(trial_dir)
    info = source.trial.info()
    hp_mlflow = (source.config.get("hyperparameters") or {}).get("mlflow") or {}
    uri = (
        tracking_uri
        or hp_mlflow.get("tracking_uri")
        or info.get("mlflow_tracking_uri")
        or default_tracking_uri(source.trial.experiment_dir.parent)
    )
    name = source.config.get("name") or source.trial.experiment_dir.name
    result = mirror(
        source,
        tracking_uri=uri,
        experiment_name=experiment_name or hp_mlflow.get("experiment_name") or name,
        registered_model_name=(
            registered_model_name or hp_mlflow.get("registered_model_name") or name
        ),
        work_dir=source.trial.path / "mirror",
        reuse_run_id=info.get("mlflow_run_id"),
        progress=progress,
        decoding=decoding,
        report_root=source.trial.path,
        evaluation=evaluation,
    )
    print(result.summary)
    print_where_to_look(result)
    return result


def print_where_to_look(result: MirrorResult) -> None:
    uri = result.tracking_uri
    if uri.startswith("sqlite:///"):
        print(
            f"\nBrowse it:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
            "(then open http://127.0.0.1:5000)"
        )
    else:
        print(f"\nBrowse it:  {uri}")
    if result.version:
        name = result.model_uri
        print(
            f"Serve it:   MLFLOW_TRACKING_URI={uri} mlflow models serve -m {name} "
            "--env-manager local --host 127.0.0.1 --port 5001"
        )
