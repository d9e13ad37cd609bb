"""Evaluation data from anywhere: ``text2sql evaluate --data <source>``.

A model is scored on any source the data config understands, with the loader training uses
(`dataset_utils.sources.load_source`), so the rows and schemas look exactly as in training:

- a Spider-layout folder (``dev.json(l)`` / ``train_spider.json(l)`` / any single rows file,
  ``database/<db_id>/<db_id>.sqlite``): format ``spider``, split ``dev`` unless given;
- a rows file (CSV / JSON / JSONL / Parquet) whose columns say what it is: ``question``,
  ``query``, ``db_id`` (Spider-style; ``--db`` is the folder holding ``<db_id>/<db_id>.sqlite``);
  ``question``, ``context``, ``answer`` (sql-create-context: schema-only rows, judged on
  synthetic databases); else ``question`` plus ``sql``/``query``/``answer`` (format
  ``custom``), with ``--db`` one SQLite file every row runs on (its schema becomes the
  prompt's schema);
- ``--format`` and ``--columns`` override the guess.

Difficulty labels are added as in training (`dataset_utils.subsets.with_difficulty`), so the
report has the same per-difficulty tables.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.schema import is_sqlite_file, schema_from_sqlite
from dataset_utils.sources import FORMATS, SourceSpec, load_source, read_table
from dataset_utils.subsets import with_difficulty

SQL_COLUMNS = ("sql", "query", "answer")


def guess_spec(
    data: Path,
    *,
    fmt: str | None,
    split: str | None,
    db: Path | None,
    schema_style: str,
    columns: dict[str, str],
    limit: int | None,
) -> SourceSpec:
    """The `SourceSpec` for ``data`` (see the module docstring)."""
    if data.is_dir():
        spider_like = (data / "database").is_dir() or (data / "tables.json").is_file()
        return SourceSpec(
            format=fmt or ("spider" if spider_like or db else "custom"),
            path=str(data),
            split=split or "dev",
            columns=columns,
            database_dir=str(db) if db and db.is_dir() else None,
            limit=limit,
            schema_style=schema_style,
        )
    head = read_table(data, limit=1)[0]
    cols = set(head)
    if fmt is None:
        if {"question", "query", "db_id"} <= cols:
            fmt = "spider"
        elif {"question", "context", "answer"} <= cols:
            fmt = "sql-create-context"
        else:
            fmt = "custom"
    if fmt == "custom" and not columns:
        sql_col = next((c for c in SQL_COLUMNS if c in cols), None)
        if "question" not in cols or sql_col is None:
            raise UserError(
                f"{data}: cannot tell which columns hold the question and the SQL (found "
                f"{', '.join(sorted(cols))}); pass --columns question=<col>,sql=<col>"
            )
        columns = {"question": "question", "sql": sql_col}
        if "context" in cols:
            columns["context"] = "context"
    if fmt == "spider" and (db is None or not db.is_dir()):
        raise UserError(
            f"{data}: Spider-style rows (db_id) need --db <folder holding <db_id>/<db_id>.sqlite>"
        )
    return SourceSpec(
        format=fmt,
        path=str(data),
        split=split or "train",
        columns=columns,
        database_dir=str(db) if fmt == "spider" and db else None,
        limit=limit,
        schema_style=schema_style,
    )


def load_eval_examples(
    data: str,
    *,
    fmt: str | None = None,
    split: str | None = None,
    db: str | None = None,
    schema_style: str = "ddl",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[Example], str]:
    """Examples to score and where they came from (one `UserError` for any bad input)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"--data {data}: no such file or folder")
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(sorted(FORMATS))}")
    db_path = Path(db).expanduser() if db else None
    if db_path is not None and not db_path.exists():
        raise UserError(f"--db {db}: no such file or folder")
    spec = guess_spec(
        path,
        fmt=fmt,
        split=split,
        db=db_path,
        schema_style=schema_style,
        columns=dict(columns or {}),
        limit=limit,
    )
    loaded = load_source(spec)
    examples = loaded.examples
    if db_path is not None and db_path.is_file():
        # One database for every row: the gold runs on it, and its schema is the prompt's
        # (unless the row brings its own schema text).
        if not is_sqlite_file(db_path):
            raise UserError(f"--db {db}: not a SQLite database (no SQLite header)")
        schema = schema_from_sqlite(str(db_path.resolve()), schema_style)
        examples = [
            dataclasses.replace(e, db_path=str(db_path.resolve()), context=e.context or schema)
            for e in examples
        ]
    if not examples:
        raise UserError(f"--data {data}: no rows")
    bare = sum(1 for e in examples if not e.db_path and not e.context.strip())
    if bare:
        raise UserError(
            f"--data {data}: {bare} of {len(examples)} rows carry neither a schema (context "
            "column) nor a database: give --db <SQLite file they run on>"
        )
    return with_difficulty(examples), loaded.origin
