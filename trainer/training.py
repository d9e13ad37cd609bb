"""The training layer: `TrainingArguments`, the `Trainer`, and what every checkpoint gets.

The steps of the training story (`trainer.job.train`), each named for what it builds:

- `build_training_args`: the YAML's ``training_args`` plus what the run decides (output folder,
  precision for the GPU found, DeepSpeed config, sampler), checked by
  `trainer.config.validate_training_args`;
- `build_trainer`: `trainer.hf_trainer.Text2SqlTrainer` with our collator and callbacks;
- `CheckpointManifest`: writes ``text2sql.json`` (`trainer.checkpoint`) into every checkpoint;
- `prepare`: everything before training, without training (``text2sql run --prepare-only``).

`RunEnv` is what the cluster / off-cluster wiring (`trainer.job`) hands the story: where to
write, which callbacks, what to resume from.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, TrainerCallback, TrainerState

from dataset_utils.errors import UserError
from dataset_utils.pipeline import PreparedData
from trainer.checkpoint import checkpoint_manifest, write_manifest
from trainer.config import TRAINING_ARGS_DEFAULTS, Hyperparameters, validate_training_args
from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer
from trainer.modeling import (
    adapted_layers,
    load_tokenizer,
    peft_config,
    quantization_config,
    resolve_model_path,
    use_bf16,
)
from trainer.training_data import build_datasets

log = logging.getLogger(__name__)


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


def build_training_args(hp: Hyperparameters, env: RunEnv) -> Any:
    import torch

    args = {**TRAINING_ARGS_DEFAULTS, **hp.training_args}
    args["output_dir"] = env.output_dir
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


def gpu_precision_args(capability: tuple[int, int]) -> dict[str, Any]:
    """TrainingArguments a GPU of this compute capability should get by default.

    TF32 on Ampere and newer (capability 8.0+): what still runs in fp32 -- the fp32 master
    weights' matmuls outside autocast, the upcast logits of the loss, fp32 LoRA adapters --
    uses the tensor cores at ~8x the fp32 rate (10-bit mantissa products, fp32 accumulation;
    PyTorch leaves it off by default). Older GPUs: TrainingArguments refuses ``tf32``.
    """
    return {"tf32": True} if tuple(capability) >= (8, 0) else {}


def build_trainer(
    hp: Hyperparameters,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    args: Any,
    env: RunEnv,
    generation_metrics: Callable[[Any], dict[str, float]] | None = None,
) -> Any:
    """`Text2SqlTrainer` with our collator; ``generation_metrics`` (execution accuracy on a
    validation subset: `evaluation.validation.build_generation_metrics`) runs at each
    evaluation."""
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
        generation_metrics=generation_metrics,
        checkpointing_min_tokens=(
            hp.efficiency.checkpointing_min_tokens
            if hp.efficiency.activation_checkpointing == "auto"
            else None
        ),
        max_tokens_per_batch=hp.efficiency.max_tokens_per_batch,
    )


def prepare(hp: Hyperparameters, *, deepspeed: str | None = None) -> dict[str, Any]:
    """Everything `trainer.job.train` does before training, without training (``text2sql run
    --prepare-only``): tokenizer, data loaded, split and tokenized into the cache (so the real
    run starts on a cache hit), ``TrainingArguments``, the model's config (reachable, no
    weights loaded) and the method's adapter / 4-bit settings. Returns the data report."""
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


class CheckpointManifest(TrainerCallback):
    """Writes ``text2sql.json`` (`trainer.checkpoint.checkpoint_manifest`: resolved
    hyperparameters, experiment config, prompt format, data fingerprint, code provenance) into
    every checkpoint, so a checkpoint can be evaluated, mirrored or reproduced without the run
    that made it."""

    def __init__(
        self,
        hp: Hyperparameters,
        data: PreparedData,
        config: dict[str, Any],
        provenance: dict[str, Any] | None = None,
    ):
        self.manifest = checkpoint_manifest(hp, data, config, provenance)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                write_manifest(path, self.manifest)


def finished_checkpoint_state(checkpoint: str | None, max_steps: int) -> Any:
    """The checkpoint's `TrainerState` when it already reached ``max_steps`` (> 0), else None."""
    if checkpoint is None or max_steps <= 0:
        return None
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    state = TrainerState.load_from_json(str(path))
    return state if state.global_step >= max_steps else None


def last_saved_step(trainer: Any) -> int:
    out = Path(trainer.args.output_dir)
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name[11:].isdigit()]
    return max(steps, default=0)


def _uses_flash_attention(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "flash" in str(getattr(base.config, "_attn_implementation", ""))


def _liger_ok() -> bool:
    import torch

    ok = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if not ok:
        log.warning("efficiency.liger_kernel: liger-kernel or a GPU is missing; skipped")
    return ok
