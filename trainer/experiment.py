"""Load, override, validate and resolve a Determined experiment YAML.

Everything a user can get wrong in an experiment file is caught here, before a process (or a
GPU) is started: YAML syntax, Determined's own schema (``cluster.expconf``), unknown or ill-typed
hyperparameters (``trainer.config``), ``TrainingArguments`` themselves, and a searcher metric
the trainer never reports.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.expconf import default_schema_dir, validate_experiment
from cluster.expconf_fields import TOP_LEVEL_KEYS, field_errors
from dataset_utils.errors import UserError
from dataset_utils.settings import hub_offline
from dataset_utils.sources import load_source
from trainer.config import EMBEDDED_MODELS, Hyperparameters, parse_hyperparameters

# What the trainer reports to the searcher (validation group). Per-difficulty execution
# accuracies are reported by the final evaluation, not during training.
VALIDATION_METRICS = (
    "eval_loss",
    "eval_token_accuracy",
    "eval_execution_accuracy",
    "eval_exact_match",
    "eval_executable_rate",
    "eval_valid_sql_rate",
    "eval_bleu",
)
GENERATION_METRICS = VALIDATION_METRICS[2:]
LAUNCHERS = ("none", "torch_distributed", "deepspeed")
# One list of a Determined experiment config's top-level keys (`cluster.expconf_fields`).
_TOP_LEVEL_KEYS = TOP_LEVEL_KEYS


@dataclass
class Experiment:
    """A validated experiment: raw config (after overrides) and parsed hyperparameters."""

    path: Path
    config: dict[str, Any]
    hparams: Hyperparameters
    resolved_hparams: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.stem)

    @property
    def slots(self) -> int:
        return int((self.config.get("resources") or {}).get("slots_per_trial", 1) or 1)

    @property
    def launcher(self) -> str:
        entry = self.config.get("entrypoint") or ""
        entry = " ".join(entry) if isinstance(entry, list) else str(entry)
        if "determined.launch.deepspeed" in entry:
            return "deepspeed"
        if "determined.launch.torch_distributed" in entry:
            return "torch_distributed"
        return "none"

    @property
    def context_dir(self) -> Path:
        """The Determined context directory (the repo root for files under experiments/)."""
        return _context_dir(self.path)


def _context_dir(path: Path) -> Path:
    parent = path.resolve().parent
    for d in (parent, *parent.parents):
        if (d / "pyproject.toml").is_file() or (d / ".detignore").is_file():
            return d
    return Path.cwd()


def load_yaml_as_det(text: str) -> Any:
    """Parse YAML exactly as the ``det`` CLI parses an experiment file and ``--config`` values
    (``determined.common.util.yaml_safe_load``: ruamel.yaml, safe, YAML 1.2). PyYAML differs: it
    keeps the last of two duplicated keys (ruamel refuses the file), reads ``1e-3`` as a
    string and ``yes`` as true. What `text2sql run` / `validate` accept, `det e create` does."""
    from determined.common import util, yaml

    try:
        return util.yaml_safe_load(text)
    except (yaml.error.YAMLError, yaml.error.YAMLWarning) as e:
        raise YamlError(e) from None


class YamlError(ValueError):
    """A YAML syntax error (or duplicated key), with ruamel's marks."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        self.problem_mark = getattr(error, "problem_mark", None)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"experiment file {path} does not exist")
    if path.is_dir():
        raise UserError(f"experiment file {path} is a directory; give a .yaml file")
    try:
        data = load_yaml_as_det(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"experiment file {path} is not UTF-8 text") from None
    except YamlError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(
            f"experiment file {path} is not valid YAML{where}: {e.problem} (`det e create` "
            "refuses it too)"
        ) from None
    if data is None:
        raise UserError(f"experiment file {path} is empty")
    if not isinstance(data, dict):
        raise UserError(f"experiment file {path} must be a mapping, found {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value (e.g. training_args.max_steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise UserError(f"--set {item!r}: invalid key {key!r}")
    try:
        value = load_yaml_as_det(raw) if raw.strip() else ""
    except YamlError:  # not YAML: the literal text, as a string
        value = raw
    return key.split("."), value


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Apply ``key=value`` overrides. Keys address hyperparameters unless they start with a
    top-level experiment key (``resources.slots_per_trial=1``) or ``hyperparameters.``."""
    applied = []
    for item in overrides:
        parts, value = parse_override(item)
        if parts[0] == "hyperparameters":
            parts = parts[1:]
            target = config.setdefault("hyperparameters", {})
        elif parts[0] in _TOP_LEVEL_KEYS and parts[0] not in (config.get("hyperparameters") or {}):
            target = config
        else:
            target = config.setdefault("hyperparameters", {})
        node: Any = target
        for i, p in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise UserError(f"--set {item!r}: index {p} out of range")
                node = node[int(p)]
                continue
            if p not in node or not isinstance(node[p], (dict, list)):
                node[p] = [] if nxt.isdigit() else {}
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) > len(node):
                raise UserError(f"--set {item!r}: index {last} out of range")
            if int(last) == len(node):
                node.append(value)
            else:
                node[int(last)] = value
        else:
            node[last] = value
        applied.append(item)
    return applied


def _is_search_space(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("type"), str)
        and v["type"] in ("const", "categorical", "int", "double", "log")
    )


def resolve_hparams(hparams: dict[str, Any], notes: list[str], prefix: str = "") -> dict[str, Any]:
    """Pick one concrete value per search space, as one local trial (the cluster searches)."""
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        path = f"{prefix}{k}"
        if _is_search_space(v):
            t = v["type"]
            if t == "const":
                out[k] = v.get("val")
                continue
            if t == "categorical":
                vals = v.get("vals") or []
                if not vals:
                    raise UserError(f"hyperparameters.{path}: categorical with no vals")
                out[k] = vals[0]
                notes.append(f"{path}={vals[0]!r} (first of categorical {vals})")
            elif t == "int":
                out[k] = int(v["minval"])
                notes.append(f"{path}={out[k]} (minval of int range)")
            elif t == "double":
                out[k] = (float(v["minval"]) + float(v["maxval"])) / 2
                notes.append(f"{path}={out[k]:g} (middle of double range)")
            else:
                base = float(v.get("base", 10))
                out[k] = base ** ((float(v["minval"]) + float(v["maxval"])) / 2)
                notes.append(f"{path}={out[k]:g} (geometric middle of log range)")
        elif isinstance(v, dict):
            out[k] = resolve_hparams(v, notes, f"{path}.")
        else:
            out[k] = v
    return out


def check_schema(config: dict[str, Any], path: Path, *, required: bool = False) -> str:
    """Validate against Determined's expconf JSON Schemas when they are available.

    The schemas come from ``../shared/determined/expconf-v0`` or ``$TEXT2SQL_EXPCONF_DIR``. A
    user's machine may have neither: the fields this project reads are then checked by
    `cluster.expconf_fields` (types, ranges, unknown top-level keys) with a warning naming
    where to put the full schemas. ``required`` (the user pointed at schemas explicitly) makes
    a missing schema directory an error instead. Returns ``"determined"`` or ``"project"``:
    which check ran.
    """
    schema_dir = default_schema_dir()
    if not required and not schema_dir.is_dir():
        logging.getLogger(__name__).warning(
            "Determined expconf schemas not found at %s: skipping the schema check; checked "
            "the fields this project reads instead (set TEXT2SQL_EXPCONF_DIR to Determined's "
            "schemas/expconf/v0, or `text2sql validate --schemas DIR`, for the full check)",
            schema_dir,
        )
        errors = field_errors(config)
        if errors:
            shown = "; ".join(e.replace("<config>.", "") for e in errors[:5])
            more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
            raise UserError(f"{path}: not a valid experiment config: {shown}{more}")
        return "project"
    errors = validate_experiment(config)
    if errors:
        shown = "; ".join(e.replace("<config>.", "") for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise UserError(f"{path}: not a valid Determined experiment config: {shown}{more}")
    return "determined"


def check_searcher(config: dict[str, Any], hp: Hyperparameters, path: Path) -> None:
    searcher = config.get("searcher") or {}
    metric = searcher.get("metric")
    if metric is None:
        return
    if metric not in VALIDATION_METRICS:
        raise UserError(
            f"{path}: searcher.metric {metric!r} is never reported by the trainer; choose one of "
            f"{', '.join(VALIDATION_METRICS)}"
        )
    if metric in GENERATION_METRICS and hp.eval.generation_samples == 0:
        raise UserError(f"{path}: searcher.metric {metric!r} needs eval.generation_samples > 0")
    if hp.training_args.get("eval_strategy", "no") == "no":
        raise UserError(
            f"{path}: searcher.metric {metric!r} is only reported when the trainer evaluates; "
            "set training_args.eval_strategy (steps or epoch)"
        )
    if searcher.get("name") in ("adaptive_asha", "async_halving"):
        unit, length = searcher.get("time_metric"), searcher.get("max_time")
        steps = hp.training_args.get("max_steps", -1)
        if unit == "batches" and steps != length:
            raise UserError(
                f"{path}: searcher.max_time ({length} batches) must equal "
                f"training_args.max_steps ({steps})"
            )
    max_length = searcher.get("max_length")
    if isinstance(max_length, dict) and "batches" in max_length:
        steps = hp.training_args.get("max_steps", -1)
        if steps != max_length["batches"]:
            raise UserError(
                f"{path}: searcher.max_length.batches ({max_length['batches']}) must equal "
                f"training_args.max_steps ({steps})"
            )


def check_resources(exp: Experiment) -> None:
    ta = exp.hparams.training_args
    slots = exp.slots
    if slots < 1:
        raise UserError(f"{exp.path}: resources.slots_per_trial must be >= 1, found {slots}")
    global_batch = int(ta.get("per_device_train_batch_size", 8)) * slots
    n_train_cap = exp.hparams.data.number_of_samples
    if n_train_cap is not None and global_batch > n_train_cap:
        raise UserError(
            f"{exp.path}: slots_per_trial={slots} x per_device_train_batch_size="
            f"{ta.get('per_device_train_batch_size', 8)} = {global_batch} exceeds "
            f"data.number_of_samples={n_train_cap}: some ranks would get no data"
        )
    ds = ta.get("deepspeed")
    if isinstance(ds, str):
        p = Path(ds)
        if not p.is_absolute():
            p = exp.context_dir / p
        if not p.is_file():
            raise UserError(f"{exp.path}: training_args.deepspeed config {ds!r} not found ({p})")


def load_experiment(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    schema: bool = True,
    schema_required: bool = False,
) -> Experiment:
    """Read + override + validate; raises `UserError` with one clear line on any problem."""
    path = Path(path)
    config = read_yaml(path)
    config = copy.deepcopy(config)
    apply_overrides(config, overrides)
    if schema:
        check_schema(config, path, required=schema_required)
    notes: list[str] = []
    raw_hp = config.get("hyperparameters") or {}
    if not isinstance(raw_hp, dict):
        raise UserError(f"{path}: hyperparameters must be a mapping")
    resolved = resolve_hparams(raw_hp, notes)
    try:
        hp = parse_hyperparameters(resolved, base_dir=_context_dir(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    exp = Experiment(path=path, config=config, hparams=hp, resolved_hparams=resolved, notes=notes)
    check_searcher(config, hp, path)
    check_resources(exp)
    return exp


def check_local_inputs(exp: Experiment) -> None:
    """Off-cluster, before a trial folder is touched: the model, the optional packages the
    method needs and every data source exist and parse here. (Not part of `load_experiment`:
    a YAML validated for a cluster may name paths that only exist there.)"""
    hp = exp.hparams
    _check_model(hp.model.name_or_path, hp.model.gguf_file, hp.model.revision, exp.path)
    if hp.method == "qlora" and not _importable("bitsandbytes"):
        raise UserError(
            f"{exp.path}: method 'qlora' needs bitsandbytes, which is not installed here: "
            "pip install 'text2sql-finetune[qlora]' (bitsandbytes==0.50.2)"
        )

    for source in hp.data.sources:
        load_source(source.to_spec())


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_model(name: str, gguf_file: str | None, revision: str | None, path: Path) -> None:
    if name in EMBEDDED_MODELS:
        return
    local = Path(name).expanduser()
    if local.exists():
        if local.is_dir() and not gguf_file and not (local / "config.json").is_file():
            raise UserError(
                f"{path}: model.name_or_path: {name} is not a model folder (no config.json)"
            )
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise UserError(f"{path}: model.name_or_path: local model folder {name} does not exist")

    if not hub_offline():
        return  # a Hub id: the download reports its own errors
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, gguf_file or "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id is just "not cached"
        cached = None
    if not isinstance(cached, str):
        raise UserError(
            f"{path}: model.name_or_path: model {name!r} is not in the local HuggingFace cache "
            "and the Hub is offline (HF_HUB_OFFLINE=1); download it first, use a local folder, "
            "or the embedded default 'embedded:smollm2-135m-instruct'"
        )


def local_world_size(exp: Experiment) -> int:
    """slots_per_trial, capped to the CPUs (or GPUs) present."""
    import torch

    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    return max(1, min(exp.slots, devices))


def threads_per_rank(world: int) -> int:
    return max(1, math.floor((os.cpu_count() or 1) / world))
