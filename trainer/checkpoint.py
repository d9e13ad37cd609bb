"""The checkpoint format: what a checkpoint folder holds besides the weights, and how to load one.

Every checkpoint carries ``text2sql.json`` (`MANIFEST`): resolved hyperparameters, experiment
config (credentials scrubbed), prompt format, data report, library versions and code
provenance, so it can be evaluated, mirrored, served or reproduced without the run that made
it. The training loop writes it (`trainer.training.CheckpointManifest` calls
`checkpoint_manifest` / `write_manifest`); evaluation, the MLflow mirror and serving read it
(`read_manifest`, `load_checkpoint`). Base + adapter loading (`load_adapter_model`) is the one
path both a checkpoint and a logged MLflow model use.

torch / transformers / peft are imported inside the loaders: reading a manifest is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan
from dataset_utils.pipeline import PreparedData
from dataset_utils.redact import scrub
from trainer.config import Hyperparameters, ModelArgs, from_dict
from trainer.modeling import load_model, torch_dtype


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    hp: Hyperparameters
    plan: FormatPlan
    model: Any
    tokenizer: Any
    is_adapter: bool


MANIFEST = "text2sql.json"


def checkpoint_files(path: Path) -> Path:
    """The folder that holds a checkpoint's files, in either layout a checkpoint is stored in.

    - The local run store (``runs/<x>/trial-<n>/checkpoints/<uuid>/``) and a Trainer's own
      ``checkpoint-<step>/`` folder: the files (``text2sql.json``, weights, tokenizer) at the top.
    - Determined checkpoint storage, as `DetCallback` uploads the Trainer's output folder:
      ``<uuid>/checkpoint-<step>/...`` beside Determined's ``<uuid>/metadata.json``. That is
      also what ``text2sql mirror --experiment-id`` downloads.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    steps = sorted(p for p in path.glob("checkpoint-*") if (p / MANIFEST).is_file())
    if len(steps) == 1:
        return steps[0]
    if len(steps) > 1:
        raise UserError(
            f"{path} holds {len(steps)} checkpoints ({', '.join(p.name for p in steps)}); "
            "pass one of them"
        )
    raise UserError(
        f"{path} has no {MANIFEST} (at its top or in one checkpoint-<step>/ folder): not a "
        "checkpoint written by this trainer"
    )


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``text2sql.json`` (either layout, see `checkpoint_files`); a missing or
    damaged one is one `UserError` that names the file and what is wrong with it."""
    f = checkpoint_files(Path(ckpt)) / MANIFEST
    damaged = f"checkpoint manifest {f} is damaged"
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{damaged}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{damaged}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
            "restore it from the run that wrote the checkpoint or from another checkpoint of "
            "the same trial"
        ) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{damaged}: expected a JSON object, found {type(manifest).__name__}")
    for key in ("hyperparameters", "format_plan"):
        if not isinstance(manifest.get(key), dict):
            found = "missing" if key not in manifest else type(manifest[key]).__name__
            raise UserError(f"{damaged}: {key!r} must be an object, found {found}")
    return manifest


def load_checkpoint(ckpt: str | Path) -> LoadedCheckpoint:
    """Load tokenizer + model from a checkpoint folder (weights via safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoint_files(Path(ckpt))
    manifest = read_manifest(ckpt)
    try:
        hp = from_dict(Hyperparameters, manifest["hyperparameters"])
    except UserError as e:
        raise UserError(f"checkpoint manifest {ckpt / 'text2sql.json'} is damaged: {e}") from None
    try:
        plan = FormatPlan(**manifest["format_plan"])
    except TypeError as e:
        raise UserError(
            f"checkpoint manifest {ckpt / 'text2sql.json'} is damaged: format_plan: {e}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_adapter = (ckpt / "adapter_config.json").is_file()
    if is_adapter:
        if not (ckpt / "adapter_model.safetensors").is_file():
            raise UserError(f"{ckpt}: adapter weights must be adapter_model.safetensors")
        # QLoRA adapters are applied to the base in its compute dtype, not 4-bit: 4-bit models
        # cannot be saved, and serving does not need them.
        base_args = hp.model
        if hp.method == "qlora" and hp.quantization is not None:
            base_args = _with_dtype(hp.model, hp.quantization.compute_dtype)
        model = load_adapter_model(base_args, ckpt, tokenizer)
    else:
        if not any(ckpt.glob("*.safetensors")):
            raise UserError(f"{ckpt}: full-model weights must be *.safetensors")
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch_dtype(hp.model.dtype), use_safetensors=True
        )
    model.eval()
    return LoadedCheckpoint(ckpt, manifest, hp, plan, model, tokenizer, is_adapter)


def load_adapter_model(base_args: ModelArgs, adapter_dir: str | Path, tokenizer: Any) -> Any:
    """The base model with the LoRA adapter in ``adapter_dir`` on top (peft's own files); the
    base's embeddings grow to the tokenizer when training added tokens. Checkpoints
    (`load_checkpoint`) and logged MLflow models (`cluster.mlflow_model`) both load this way."""
    from peft import PeftModel

    base = load_model(base_args)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(base, adapter_dir)


def _with_dtype(model_args: ModelArgs, dtype: str) -> ModelArgs:
    import torch

    return dataclasses.replace(model_args, dtype=dtype if torch.cuda.is_available() else "float32")


def checkpoint_manifest(
    hp: Hyperparameters,
    data: PreparedData,
    config: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``text2sql.json`` of a run's checkpoints. Credentials (a `training_args.hub_token`,
    `environment_variables` values) are scrubbed: checkpoints are uploaded, shared and
    mirrored."""
    return {
        "hyperparameters": scrub(asdict(hp)),
        "experiment_config": scrub(config),
        "format_plan": asdict(data.plan),
        "data_report": data.report,
        "versions": _versions(),
        "provenance": provenance or {},
    }


def write_manifest(checkpoint_dir: Path, manifest: dict[str, Any]) -> None:
    (checkpoint_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "deepspeed", "determined"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
