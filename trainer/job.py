"""One training job: the story (`train`) and where it runs (`run_on_cluster`, `run_off_cluster`).

`train` reads top to bottom: seed -> tokenizer -> datasets -> `TrainingArguments` -> model
(full / LoRA / QLoRA from config) -> `Trainer` (with execution accuracy on a validation
subset) -> train, resuming when a checkpoint exists -> final checkpoint. It does not know
where it runs; the two wirings fill in its `trainer.training.RunEnv`:

- `run_on_cluster`: a Determined trial (hyperparameters from the trial, Core API context,
  `FixedDetCallback`);
- `run_off_cluster`: a local trial folder written by `trainer.local_runner` (Core API local
  context, run store, SIGTERM preemption, live MLflow metrics).

`trainer/finetune.py` is the command line that picks one; the local runner calls
`run_off_cluster` in-process for one slot.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import transformers
import yaml
from transformers import set_seed

from cluster.mlflow_lineage import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    checkpoint_lineage_tags,
    code_provenance,
    dataset_inputs,
    source_formats,
)
from cluster.mlflow_tracking import (
    MlflowLiveLogger,
    configure_quiet_mlflow_http,
    resolve_tracking_uri,
)
from evaluation.validation import build_generation_metrics
from trainer.callbacks import LocalRunCallback, PreemptionWatcher, fixed_det_callback_class
from trainer.config import Hyperparameters, parse_hyperparameters
from trainer.det_wiring import core_init, distributed_context
from trainer.modeling import build_model, count_parameters, load_tokenizer
from trainer.run_store import TrialDir
from trainer.training import (
    CheckpointManifest,
    RunEnv,
    build_trainer,
    build_training_args,
    finished_checkpoint_state,
    last_saved_step,
)
from trainer.training_data import build_datasets

log = logging.getLogger("trainer")


def train(hp: Hyperparameters, env: RunEnv) -> dict[str, Any]:
    """Train one trial; returns a summary (steps, losses, data report)."""
    set_seed(int(hp.training_args.get("seed", 42)))
    tokenizer = load_tokenizer(hp.model)
    data = build_datasets(hp, tokenizer)
    if env.should_stop():
        return _stopped_before_training(env, data.report, "after preparing the data")
    if env.is_chief:
        r = data.report
        log.info(
            "data: %d train / %d valid / %d test examples (%d duplicates removed; dropped as too "
            "long: %d train, %d valid, %d test; cache %s)",
            r["n_train"],
            r["n_valid"],
            r["n_test"],
            r["duplicates_removed"],
            r["dropped_too_long_train"],
            r["dropped_too_long_valid"],
            r["dropped_too_long_test"],
            r["cache"],
        )
        for listener in env.on_data:
            listener(data)
    # TrainingArguments first: with a ZeRO-3 config they switch on sharded model loading.
    args = build_training_args(hp, env)
    model = build_model(hp, tokenizer)
    if env.should_stop():
        return _stopped_before_training(env, data.report, "after loading the model")
    trainable, total = count_parameters(model)
    if env.is_chief:
        log.info(
            "model: %s, method %s: %s trainable of %s parameters (%.2f%%)",
            hp.model.name_or_path,
            hp.method,
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
    env.callbacks.insert(0, CheckpointManifest(hp, data, env.experiment_config, env.provenance))
    validation = build_generation_metrics(
        hp, tokenizer, data.plan, data.examples["valid"], env.progress
    )
    trainer = build_trainer(hp, model, tokenizer, data, args, env, validation)
    t0 = time.perf_counter()
    # The trainer's own args (build_training_args may be replaced, e.g. in tests).
    max_steps = int(getattr(trainer.args, "max_steps", 0) or 0)
    finished = finished_checkpoint_state(env.resume_from_checkpoint, max_steps)
    if finished is not None:
        # Killed after its last checkpoint: nothing left to train. (transformers 5.23 would
        # run one more step, max_steps + 1, if asked to resume from a checkpoint at max_steps.)
        log.info("checkpoint at step %d already reached max_steps: nothing to train", max_steps)
        trainer.state = finished
        train_loss = None  # the mean of the logged losses, below
    else:
        train_loss = trainer.train(resume_from_checkpoint=env.resume_from_checkpoint).training_loss
    seconds = time.perf_counter() - t0
    # Always leave the final state in a checkpoint (DetCallback / LocalRunCallback store it).
    if finished is None and trainer.state.global_step > last_saved_step(trainer):
        trainer._save_checkpoint(trainer.model, trial=None)
        trainer.control = trainer.callback_handler.on_save(args, trainer.state, trainer.control)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if train_loss is None:
        train_loss = sum(losses) / len(losses) if losses else float("nan")
    return {
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train_loss": train_loss,
        "losses": losses,
        "seconds": seconds,
        "data": data.report,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "preempted": any(getattr(c, "preempted", False) for c in env.callbacks),
        # What actually trained: tests (and users) check the launcher gave what was asked.
        "world_size": getattr(trainer.args, "world_size", 1),
        "engine": type(getattr(trainer, "model_wrapped", trainer)).__name__,
    }


def _stopped_before_training(env: RunEnv, report: dict[str, Any], when: str) -> dict[str, Any]:
    """Preempted (paused) before the first step: nothing new to save; the next run resumes from
    the checkpoint this one started from, if any."""
    log.info("preempted %s, before training: exiting without a new checkpoint", when)
    step = 0
    if env.resume_from_checkpoint is not None:
        state = Path(env.resume_from_checkpoint) / "trainer_state.json"
        if state.is_file():
            step = int(json.loads(state.read_text()).get("global_step", 0))
    return {"global_step": step, "losses": [], "data": report, "preempted": True}


def setup_logging(is_chief: bool) -> None:
    level = logging.INFO if is_chief else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    logging.getLogger("trainer").setLevel(level)
    transformers.utils.logging.set_verbosity_warning()


# --------------------------------------------------------------------------------------------
# Where it runs.


def run_on_cluster(info: Any) -> dict[str, Any]:
    """On a Determined cluster: Core API context + (fixed) DetCallback."""
    hp = parse_hyperparameters(info.trial.hparams)
    config = info.trial._config
    distributed = distributed_context()
    rank = distributed.rank if distributed is not None else 0
    setup_logging(rank == 0)
    output_dir = hp.training_args.get("output_dir") or "/tmp/text2sql-output"
    env = RunEnv(
        output_dir=output_dir,
        deepspeed=hp.training_args.get("deepspeed"),
        experiment_config=config,
        is_chief=rank == 0,
        progress=False,
        searcher_metric=config.get("searcher", {}).get("metric"),
        provenance=code_provenance() if rank == 0 else {},
    )
    with core_init(distributed) as core_context:
        # A pause (or a higher-priority job) may arrive while the container installs, the data
        # is tokenized or the model downloads: `train` checks between those steps, and
        # FixedDetCallback at every training step. The check reads the flag a background
        # long-poll keeps current (plus, with several ranks, one broadcast from the chief).
        env.should_stop = core_context.preempt.should_preempt
        if env.should_stop():
            log.info("preempted before loading anything: exiting without a checkpoint")
            return {"global_step": info.trial._steps_completed, "preempted": True}
        args = build_training_args(hp, env)
        det_cb = fixed_det_callback_class()(core_context, args)
        env.callbacks.append(det_cb)
        # DetCallback downloaded the latest checkpoint (if any): actually resume from it.
        env.resume_from_checkpoint = det_cb.resume_from_checkpoint
        return train(hp, env)


def run_off_cluster(
    trial_dir: Path,
    *,
    progress: bool = True,
    parsed: tuple[dict[str, Any], Hyperparameters] | None = None,
) -> dict[str, Any]:
    """Off-cluster: Core API local context, run store, SIGTERM preemption, live MLflow.

    ``parsed``: the experiment config the trial folder holds and its hyperparameters, already
    parsed (the local runner's in-process run passes them on: one parse from YAML to the
    Trainer). Ranks the runner launches are other processes: they read the trial folder's
    ``experiment.yaml``.
    """
    trial = TrialDir(trial_dir)
    if parsed is None:
        config = yaml.safe_load((trial.experiment_dir / "experiment.yaml").read_text())
        hp = parse_hyperparameters(config.get("hyperparameters") or {})
    else:
        config, hp = parsed
    distributed = distributed_context()
    rank = distributed.rank if distributed is not None else 0
    is_chief = rank == 0
    setup_logging(is_chief)
    searcher = config.get("searcher") or {}
    metric = searcher.get("metric")
    smaller = bool(searcher.get("smaller_is_better", True))
    if is_chief:
        trial.clean_partial()
    latest = trial.latest_checkpoint()
    resume = None
    if latest is not None:
        resume = str(trial.checkpoint_path(latest["uuid"]))
        if is_chief:
            log.info(
                "resuming from checkpoint %s (step %s)", latest["uuid"], latest["steps_completed"]
            )
    info = trial.info()
    provenance = code_provenance(info.get("experiment_file")) if is_chief else {}
    mlflow_logger = None
    if is_chief and hp.mlflow.log_during_training:
        configure_quiet_mlflow_http()
        uri = resolve_tracking_uri(hp, trial.experiment_dir)
        exp_name = hp.mlflow.experiment_name or config.get("name") or trial.experiment_dir.name
        mlflow_logger = MlflowLiveLogger(
            uri,
            exp_name,
            run_id=info.get("mlflow_run_id"),
            run_name=f"{config.get('name', 'experiment')}-trial-{trial.trial_id}",
            tags={
                "text2sql.trial_dir": str(trial.path),
                "text2sql.source": "local",
                # The same description / source / git tags the mirror sets on this run.
                **checkpoint_lineage_tags(config, {"determined.master": "local"}, provenance),
            },
            params=asdict(hp),  # flattened and scrubbed by the logger
            experiment_tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    ckpt_policy = config.get("checkpoint_storage") or {}
    preemption = PreemptionWatcher().install()
    env = RunEnv(
        output_dir=str(trial.hf_output_dir),
        resume_from_checkpoint=resume,
        deepspeed=hp.training_args.get("deepspeed"),
        experiment_config=config,
        is_chief=is_chief,
        progress=progress and is_chief,
        searcher_metric=metric,
        provenance=provenance,
    )
    if mlflow_logger is not None:
        logger, formats = mlflow_logger, source_formats(hp)
        env.on_data.append(lambda data: logger.log_inputs(dataset_inputs(data.report, formats)))
    with core_init(distributed, checkpoint_storage=str(trial.checkpoints_dir)) as core_context:
        env.callbacks.append(
            LocalRunCallback(
                trial,
                core_context=core_context,
                preemption=preemption,
                metadata=lambda: {
                    "experiment": config.get("name"),
                    "framework": "transformers",
                    "format": "huggingface",
                    "method": hp.method,
                    "base_model": hp.model.name_or_path,
                    "searcher_metric": metric,
                },
                mlflow_logger=mlflow_logger,
                keep_latest=int(ckpt_policy.get("save_trial_latest", 1)),
                keep_best=int(ckpt_policy.get("save_trial_best", 1)),
                searcher_metric=metric,
                smaller_is_better=smaller,
                is_chief=is_chief,
            )
        )
        if is_chief:
            trial.update_info(state="ACTIVE", pid=os.getpid())
        try:
            summary = train(hp, env)
        except BaseException:
            if is_chief:
                trial.update_info(state="ERRORED")
                if mlflow_logger is not None:
                    mlflow_logger.close(status="FAILED", retries=1)
            raise
    if is_chief:
        state = "PAUSED" if summary["preempted"] else "COMPLETED"
        if mlflow_logger is not None:
            mlflow_logger.close(status="KILLED" if summary["preempted"] else "FINISHED")
        trial.update_info(
            state=state,
            steps_completed=summary["global_step"],
            mlflow_run_id=mlflow_logger.run_id if mlflow_logger else info.get("mlflow_run_id"),
            mlflow_tracking_uri=mlflow_logger.tracking_uri if mlflow_logger else None,
            data=summary["data"],
        )
        (trial.path / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
