"""Fine-tune a causal LM on text-to-SQL: the one entrypoint for every experiment.

Reads top to bottom: tokenizer -> datasets -> model (full / LoRA / QLoRA from config) ->
`Trainer` -> train (resuming when a checkpoint exists) -> final checkpoint.

Run it
  - on a Determined cluster, as the experiment's entrypoint (hyperparameters come from
    ``det.get_cluster_info().trial.hparams``)::

        python -m determined.launch.torch_distributed python -m trainer.finetune

  - off-cluster, through the local runner (``text2sql run experiments/<x>.yaml``), which writes
    the resolved experiment into a trial folder and calls this module with ``--trial-dir``
    (in-process for one slot, under torchrun / deepspeed for several).

Cluster wiring (Core API context, `DetCallback`, distributed context) lives in `run_on_cluster`
and `run_off_cluster` at the bottom; `main()` itself does not know where it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan
from dataset_utils.pipeline import PreparedData
from dataset_utils.records import Example
from dataset_utils.redact import scrub
from trainer.config import Hyperparameters, parse_hyperparameters, validate_training_args
from trainer.training_data import build_datasets

log = logging.getLogger("trainer")


@dataclass
class RunEnv:
    """Where and how this process trains (filled in by the cluster / off-cluster wiring)."""

    output_dir: str
    callbacks: list[Any] = field(default_factory=list)
    resume_from_checkpoint: str | None = None
    deepspeed: str | dict[str, Any] | None = None
    experiment_config: dict[str, Any] = field(default_factory=dict)
    is_chief: bool = True
    progress: bool = True
    searcher_metric: str | None = None
    # Polled between the loading steps (on a cluster: the master's preemption signal); training
    # steps are the callbacks' business (FixedDetCallback, LocalRunCallback).
    should_stop: Callable[[], bool] = lambda: False
    # Called on the chief with the prepared data, before the model loads (live MLflow datasets).
    on_data: list[Callable[[PreparedData], None]] = field(default_factory=list)
    # Where the code came from (git state, experiment YAML), stored in every checkpoint.
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The steps.


def build_model(hp: Hyperparameters, tokenizer: Any) -> Any:
    from trainer.modeling import apply_adapter, load_model, peft_config, quantization_config

    quant = quantization_config(hp.method, hp.quantization)
    attn = None
    if hp.efficiency.flash_attention:
        if hp.efficiency.prefix_sharing:
            # Segment attention (Text2SqlTrainer switches to it) trains shared prefixes with
            # FlexAttention on a GPU; flash-attn has no way to let blocks share a prefix.
            log.info(
                "efficiency.flash_attention: prefix_sharing trains with FlexAttention; "
                "flash-attn is used with prefix_sharing: false"
            )
        elif _flash_attn_ok():
            attn = "flash_attention_2"
    model = load_model(hp.model, quant_config=quant, attn_implementation=attn)
    return apply_adapter(
        model,
        peft_config(hp.method, hp.lora, model),
        tokenizer=tokenizer,
        activation_checkpointing=hp.efficiency.activation_checkpointing != "false",
        quantized=quant is not None,
    )


def build_training_args(hp: Hyperparameters, env: RunEnv) -> Any:
    import torch

    from trainer.modeling import use_bf16

    args = dict(hp.training_args)
    args["output_dir"] = env.output_dir
    args.setdefault("report_to", "none")
    args.setdefault("logging_steps", 10)
    args.setdefault("save_strategy", "steps")
    args.setdefault("eval_strategy", "no")
    args["remove_unused_columns"] = False  # the collator ignores the `length` column
    args["disable_tqdm"] = not env.progress
    eff = hp.efficiency
    own_sampler = eff.packing or eff.prefix_sharing or eff.max_tokens_per_batch is not None
    if eff.group_by_length and not own_sampler:
        args["train_sampling_strategy"] = "group_by_length"
    if hp.efficiency.liger_kernel:
        args["use_liger_kernel"] = _liger_ok()
    if not torch.cuda.is_available():
        args["use_cpu"] = True
        args.pop("fp16", None)
    else:
        for key, value in gpu_precision_args(torch.cuda.get_device_capability()).items():
            args.setdefault(key, value)
    if "bf16" not in args:
        args["bf16"] = use_bf16(hp.efficiency.bf16)
    if env.deepspeed is not None:
        args["deepspeed"] = env.deepspeed
    if env.searcher_metric and args.get("eval_strategy") != "no":
        args.setdefault("metric_for_best_model", env.searcher_metric)
    return validate_training_args(args, env.output_dir, user=False)


def validation_shard(subset: Sequence[Example], rank: int, world: int) -> tuple[list[Example], int]:
    """This rank's share of the validation subset, padded to the same length on every rank.

    Under ZeRO-3 every rank must run the same number of ``generate`` calls (``synced_gpus``:
    each forward all-gathers the layers' shards). With ``subset[rank::world]`` alone, 65
    samples in batches of 32 on 2 ranks give one rank 2 batches and the other 1: the first is
    still generating while the second waits in ``all_gather_object`` -- a deadlock. Filler rows
    (copies of the shard's first sample, or of the subset's) even the counts out; their
    outputs are dropped. Returns (rows to generate, how many of them are real).
    """
    shard = list(subset[rank::world])
    n_real = len(shard)
    longest = -(-len(subset) // world)
    filler = shard[0] if shard else subset[0]
    return shard + [filler] * (longest - n_real), n_real


def gpu_precision_args(capability: tuple[int, int]) -> dict[str, Any]:
    """TrainingArguments a GPU of this compute capability should get by default.

    TF32 on Ampere and newer (capability 8.0+): what still runs in fp32 -- the fp32 master
    weights' matmuls outside autocast, the upcast logits of the loss, fp32 LoRA adapters --
    uses the tensor cores at ~8x the fp32 rate (10-bit mantissa products, fp32 accumulation;
    PyTorch leaves it off by default). Older GPUs: TrainingArguments refuses ``tf32``.
    """
    return {"tf32": True} if tuple(capability) >= (8, 0) else {}


def build_generation_metrics(
    hp: Hyperparameters,
    tokenizer: Any,
    plan: FormatPlan,
    examples: Sequence[Example],
    progress: bool,
) -> Callable[[Any], dict[str, float]] | None:
    """Execution accuracy (and friends) on a fixed validation subset, decoded with
    ``eval.validation_decoding`` (greedy unless set: it runs at every evaluation)."""
    subset = list(examples[: hp.eval.generation_samples])
    if not subset:
        return None
    from evaluation.generation import generate_sql
    from evaluation.judge import GoldCache, score

    gold_cache = GoldCache()

    def metrics(model: Any) -> dict[str, float]:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        shard, n_real = validation_shard(subset, rank, world)
        zero3 = _is_zero3(model)
        gen = generate_sql(
            _unwrap(model),
            tokenizer,
            shard,
            plan,
            batch_size=hp.eval.batch_size,
            max_new_tokens=hp.eval.max_new_tokens,
            progress=progress and rank == 0,
            desc="validation generation",
            synced_gpus=zero3,
            timeout_s=hp.eval.timeout_s,
            **asdict(hp.eval.validation_decoding),
        )
        mine = gen.sql[:n_real]  # the filler rows' outputs are dropped
        preds: list[str | None] = [None] * len(subset)
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            for r, part in enumerate(gathered):
                for j, sql in enumerate(part):
                    preds[r + j * world] = sql
        else:
            preds = list(mine)
        judged = sum(p is not None for p in preds)
        result = score(
            subset, [p or "" for p in preds], timeout_s=hp.eval.timeout_s, gold_cache=gold_cache
        )
        o = result.overall
        return {
            "execution_accuracy": o.exec_accuracy,
            "exact_match": o.exact_match,
            "executable_rate": o.executable_rate,
            "valid_sql_rate": o.valid_sql_rate,
            "bleu": o.bleu,
            "judged_samples": float(judged),
        }

    return metrics


def build_trainer(
    hp: Hyperparameters,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    args: Any,
    env: RunEnv,
) -> Any:
    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer

    gen_metrics = build_generation_metrics(
        hp, tokenizer, data.plan, data.examples["valid"], env.progress
    )
    eval_on = args.eval_strategy != "no" and len(data.valid) > 0
    valid = data.valid
    if hp.eval.loss_samples is not None:
        valid = valid.select(range(min(hp.eval.loss_samples, len(valid))))
    return Text2SqlTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=valid if eval_on else None,
        data_collator=CompletionCollator(
            tokenizer.pad_token_id,
            packing=hp.efficiency.packing,
            prefix_sharing=hp.efficiency.prefix_sharing,
            # flash-attn packs by position_ids (variable-length kernels); anything else
            # reads the spans (segment attention).
            segments=hp.efficiency.prefix_sharing or not _uses_flash_attention(model),
        ),
        processing_class=tokenizer,
        callbacks=env.callbacks,
        generation_metrics=gen_metrics,
        checkpointing_min_tokens=(
            hp.efficiency.checkpointing_min_tokens
            if hp.efficiency.activation_checkpointing == "auto"
            else None
        ),
        max_tokens_per_batch=hp.efficiency.max_tokens_per_batch,
    )


def main(hp: Hyperparameters, env: RunEnv) -> dict[str, Any]:
    """Train one trial; returns a summary (steps, losses, data report)."""
    from transformers import set_seed

    from trainer.modeling import count_parameters, load_tokenizer

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
    trainer = build_trainer(hp, model, tokenizer, data, args, env)
    t0 = time.perf_counter()
    # The trainer's own args (build_training_args may be replaced, e.g. in tests).
    max_steps = int(getattr(trainer.args, "max_steps", 0) or 0)
    finished = _finished_checkpoint_state(env.resume_from_checkpoint, max_steps)
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
    if finished is None and trainer.state.global_step > _last_saved_step(trainer):
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


def prepare(hp: Hyperparameters, *, deepspeed: str | None = None) -> dict[str, Any]:
    """Everything `main` does before training, without training (``text2sql run
    --prepare-only``): tokenizer, data loaded, split and tokenized into the cache (so the real
    run starts on a cache hit), ``TrainingArguments``, the model's config (reachable, no
    weights loaded) and the method's adapter / 4-bit settings. Returns the data report."""
    import tempfile

    from transformers import AutoConfig

    from trainer.modeling import (
        adapted_layers,
        load_tokenizer,
        peft_config,
        quantization_config,
        resolve_model_path,
    )

    tokenizer = load_tokenizer(hp.model)
    data = build_datasets(hp, tokenizer)
    with tempfile.TemporaryDirectory(prefix="text2sql-prepare-") as tmp:
        build_training_args(hp, RunEnv(output_dir=tmp, progress=False))
    if deepspeed is not None:
        try:
            json.loads(Path(deepspeed).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(
                f"training_args.deepspeed {deepspeed}: not a readable JSON file: {e}"
            ) from None
    try:
        model_config = AutoConfig.from_pretrained(
            resolve_model_path(hp.model),
            revision=hp.model.revision,
            trust_remote_code=hp.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model {hp.model.name_or_path!r}: config not loadable: {e}") from None
    quantization_config(hp.method, hp.quantization)
    if hp.method != "full" and hp.lora is not None and hp.lora.last_layers is not None:
        # The full LoraConfig needs the loaded model's layer names; check the numbers here.
        adapted_layers(hp.lora, getattr(model_config, "num_hidden_layers", None))
    else:
        peft_config(hp.method, hp.lora)
    return dict(data.report)


# --------------------------------------------------------------------------------------------
# Helpers.


class CheckpointManifest(TrainerCallback):
    """Writes ``text2sql.json`` into every checkpoint: resolved hyperparameters, experiment
    config, prompt format, data fingerprint and code provenance (git commit, experiment YAML),
    so a checkpoint can be evaluated, mirrored or reproduced without the run that made it."""

    def __init__(
        self,
        hp: Hyperparameters,
        data: PreparedData,
        config: dict[str, Any],
        provenance: dict[str, Any] | None = None,
    ):
        # Credentials (a `training_args.hub_token`, `environment_variables` values) are
        # scrubbed: checkpoints are uploaded, shared and mirrored.
        self.manifest = {
            "hyperparameters": scrub(asdict(hp)),
            "experiment_config": scrub(config),
            "format_plan": asdict(data.plan),
            "data_report": data.report,
            "versions": _versions(),
            "provenance": provenance or {},
        }

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                (path / "text2sql.json").write_text(
                    json.dumps(self.manifest, indent=2, default=str)
                )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "deepspeed", "determined"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _finished_checkpoint_state(checkpoint: str | None, max_steps: int) -> Any:
    """The checkpoint's `TrainerState` when it already reached ``max_steps`` (> 0), else None."""
    if checkpoint is None or max_steps <= 0:
        return None
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(path))
    return state if state.global_step >= max_steps else None


def _last_saved_step(trainer: Any) -> int:
    out = Path(trainer.args.output_dir)
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name[11:].isdigit()]
    return max(steps, default=0)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _is_zero3(model: Any) -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except ImportError:
        return False


def _flash_attn_ok() -> bool:
    import importlib.util

    import torch

    ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if not ok:
        log.warning("efficiency.flash_attention: flash-attn or a GPU is missing; using sdpa")
    return ok


def _uses_flash_attention(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "flash" in str(getattr(base.config, "_attn_implementation", ""))


def _liger_ok() -> bool:
    import importlib.util

    import torch

    ok = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if not ok:
        log.warning("efficiency.liger_kernel: liger-kernel or a GPU is missing; skipped")
    return ok


def setup_logging(is_chief: bool) -> None:
    import transformers

    level = logging.INFO if is_chief else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    logging.getLogger("trainer").setLevel(level)
    transformers.utils.logging.set_verbosity_warning()


# --------------------------------------------------------------------------------------------
# Cluster wiring.


def run_on_cluster(info: Any) -> dict[str, Any]:
    """On a Determined cluster: Core API context + (fixed) DetCallback."""
    from cluster.mlflow_lineage import code_provenance
    from trainer.callbacks import fixed_det_callback_class
    from trainer.det_wiring import core_init, distributed_context

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
        # is tokenized or the model downloads: `main` checks between those steps, and
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
        return main(hp, env)


def run_off_cluster(trial_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Off-cluster: Core API local context, run store, SIGTERM preemption, live MLflow."""
    import yaml

    from cluster.mlflow_lineage import (
        EXPERIMENT_KIND,
        EXPERIMENT_KIND_TAG,
        checkpoint_lineage_tags,
        code_provenance,
        dataset_inputs,
        source_formats,
    )
    from trainer.callbacks import (
        LocalRunCallback,
        MlflowLiveLogger,
        PreemptionWatcher,
        configure_quiet_mlflow_http,
    )
    from trainer.det_wiring import core_init, distributed_context
    from trainer.run_store import TrialDir

    trial = TrialDir(trial_dir)
    config = yaml.safe_load((trial.experiment_dir / "experiment.yaml").read_text())
    hp = parse_hyperparameters(config.get("hyperparameters") or {})
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
            summary = main(hp, env)
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


def resolve_tracking_uri(hp: Hyperparameters, experiment_dir: Path) -> str:
    """MLflow store: the YAML's, else $MLFLOW_TRACKING_URI, else a SQLite store in runs/."""
    if hp.mlflow.tracking_uri:
        return hp.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(experiment_dir.parent / 'mlflow.db').resolve()}"


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.finetune",
        description="Fine-tune on text-to-SQL. On a Determined cluster the hyperparameters come "
        "from the trial; off-cluster pass --trial-dir (the local runner does this for you: "
        "`text2sql run experiments/<x>.yaml`).",
    )
    parser.add_argument("--trial-dir", type=Path, help="off-cluster trial folder (local runner)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    try:
        info = None
        try:
            import determined as det

            info = det.get_cluster_info()
        except ImportError:
            pass
        if info is not None and info.task_type == "TRIAL":
            run_on_cluster(info)
        elif ns.trial_dir is not None:
            run_off_cluster(ns.trial_dir, progress=not ns.no_progress)
        else:
            raise UserError(
                "not on a Determined cluster and no --trial-dir given; run experiments off-cluster "
                "with `text2sql run experiments/<x>.yaml`"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
