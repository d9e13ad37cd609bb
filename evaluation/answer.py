"""Question (+ schema or database) -> SQL (+ rows): what `text2sql ask` and the served model do.

`SqlAnswerer` wraps a loaded model, its tokenizer and prompt format (`FormatPlan`). For each
question it takes the schema as given (``schema``, SQL DDL) or reads it from a database
(``db``: a SQLite path or an SQLAlchemy URL, `evaluation.databases`), rendered in the style the
model was trained on; it generates greedily with the evaluation engine
(`evaluation.generation.generate_sql`, the same prompts and decoding as the reported
accuracies) and, when asked to execute, runs the SQL read-only, sandboxed and time-limited,
returning the first ``max_rows`` rows.

Where answerers come from:

- a training checkpoint: `from_checkpoint` (the checkpoint's format plan and schema style);
- a standalone HuggingFace folder written by ``text2sql export`` (``text2sql_model.json``
  beside the weights), any other HuggingFace folder, or a Hub id: `from_pretrained`;
- an MLflow model: ``cluster.mlflow_model`` builds one in ``load_context``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan, plan_format
from dataset_utils.records import Example
from dataset_utils.settings import hub_offline
from evaluation.databases import cached_database, jsonable
from evaluation.generation import generate_sql

# Written by `text2sql export` (and read back here): prompt format, schema style, defaults.
EXPORT_SPEC = "text2sql_model.json"


@dataclass
class Answer:
    sql: str
    columns: list[str] | None = None
    rows: list[list[Any]] | None = None
    error: str | None = None
    truncated: bool = False

    def as_record(self, executed: bool) -> dict[str, Any]:
        if not executed:
            return {"sql": self.sql}
        return {
            "sql": self.sql,
            "columns": self.columns or [],
            "rows": self.rows or [],
            "error": self.error,
        }


@dataclass
class SqlAnswerer:
    model: Any
    tokenizer: Any
    plan: FormatPlan
    schema_style: str = "ddl"
    batch_size: int = 16
    max_new_tokens: int = 128
    timeout_s: float = 5.0
    name: str = "model"
    # `trainer.config.DecodingArgs` as a dict (num_beams, execution_guided, schema_constrained):
    # the decoding the model was evaluated with; empty = greedy.
    decoding: dict[str, Any] = field(default_factory=dict)
    _schemas: dict[str, str] = field(default_factory=dict, repr=False)

    def schema_of(self, db: str) -> str:
        if db not in self._schemas:
            self._schemas[db] = cached_database(db).schema(self.schema_style)
        return self._schemas[db]

    def generate(
        self,
        examples: Sequence[Example],
        *,
        max_new_tokens: int | None = None,
        repetition_penalty: float = 1.0,
        progress: bool = False,
    ) -> list[str]:
        return generate_sql(
            self.model,
            self.tokenizer,
            list(examples),
            self.plan,
            batch_size=self.batch_size,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            repetition_penalty=repetition_penalty,
            progress=progress,
            desc=self.name,
            timeout_s=self.timeout_s,
            **self.decoding,
        ).sql

    def answer(
        self,
        questions: Sequence[str],
        *,
        schemas: Sequence[str | None] | None = None,
        dbs: Sequence[str | None] | None = None,
        execute: bool = False,
        max_rows: int = 20,
        max_new_tokens: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[Answer]:
        """One `Answer` per question. Each needs a schema or a db; ``execute`` needs a db."""
        n = len(questions)
        schemas = list(schemas) if schemas is not None else [None] * n
        dbs = list(dbs) if dbs is not None else [None] * n
        if len(schemas) != n or len(dbs) != n:
            raise ValueError("questions, schemas and dbs must have the same length")
        examples = []
        for i, (q, schema, db) in enumerate(zip(questions, schemas, dbs, strict=True)):
            if not q or not str(q).strip():
                raise UserError(f"row {i}: empty question")
            if not schema and not db:
                raise UserError(f"row {i}: give a schema (or context) or a db")
            context = schema or self.schema_of(str(db))
            examples.append(Example(question=str(q), context=context, sql="", source="ask"))
        sqls = self.generate(
            examples, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
        answers = [Answer(sql=s) for s in sqls]
        if execute:
            for a, db in zip(answers, dbs, strict=True):
                if not db:
                    a.error = "not executed: no db given"
                    continue
                res = cached_database(str(db)).run(
                    a.sql, timeout_s=self.timeout_s, max_rows=max_rows
                )
                a.columns = list(res.columns)
                a.rows = [[jsonable(v) for v in row] for row in res.rows]
                a.error = None if res.ok else res.error
                a.truncated = res.truncated
        return answers


def schema_style_of(hp: Any) -> str:
    """The schema rendering a checkpoint was trained with (its first Spider source's)."""
    for source in hp.data.sources:
        if source.format == "spider":
            return str(source.schema_style)
    return "ddl"


def from_checkpoint(loaded: Any, *, name: str | None = None) -> SqlAnswerer:
    """An answerer over an `evaluation.checkpoint_eval.LoadedCheckpoint`."""
    return SqlAnswerer(
        loaded.model,
        loaded.tokenizer,
        loaded.plan,
        schema_style=schema_style_of(loaded.hp),
        batch_size=loaded.hp.eval.batch_size,
        max_new_tokens=loaded.hp.eval.max_new_tokens,
        timeout_s=loaded.hp.eval.timeout_s,
        name=name or loaded.path.name,
        decoding=asdict(loaded.hp.eval.decoding),
    )


def read_export_spec(folder: Path) -> dict[str, Any] | None:
    f = folder / EXPORT_SPEC
    if not f.is_file():
        return None
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        FormatPlan(**spec["format_plan"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{f} is damaged: {type(e).__name__}: {e}") from None
    return spec


def from_pretrained(ref: str) -> SqlAnswerer:
    """An answerer over a HuggingFace folder (exported or not) or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(ref).expanduser()
    spec = read_export_spec(folder) if folder.is_dir() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref, use_safetensors=True)
    except (OSError, ValueError) as e:
        where = "local HuggingFace cache (HF_HUB_OFFLINE=1)" if hub_offline() else "Hub"
        raise UserError(
            f"model {ref!r} is neither a checkpoint folder (text2sql.json), an MLflow model URI "
            f"(models:/name@alias, runs:/...), a model folder nor a Hub id in the {where}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if spec is not None:
        params = spec.get("inference_params") or {}
        return SqlAnswerer(
            model,
            tokenizer,
            FormatPlan(**spec["format_plan"]),
            schema_style=str(spec.get("schema_style", "ddl")),
            batch_size=int(spec.get("batch_size", 16)),
            max_new_tokens=int(params.get("max_new_tokens", 128)),
            name=folder.name,
        )
    return SqlAnswerer(model, tokenizer, plan_format("auto", tokenizer), name=ref)


def export_spec(answerer: SqlAnswerer, **extra: Any) -> dict[str, Any]:
    """What `read_export_spec` reads back (written beside exported weights)."""
    return {
        "format_plan": asdict(answerer.plan),
        "schema_style": answerer.schema_style,
        "batch_size": answerer.batch_size,
        "inference_params": {"max_new_tokens": answerer.max_new_tokens},
        **extra,
    }
