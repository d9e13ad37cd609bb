"""Execution-guided decoding (Wang et al. 2018): pick, among beam candidates, one that runs.

Given an example's candidate SQL queries, best-ranked first, `choose_candidate` returns the
index of the first one that executes in the read-only sandbox (`evaluation.sandbox`, with a
time limit) and returns at least one non-NULL value; else of the first one that executes; else
0 (the top beam). Duplicates are run once.

Where candidates run -- only on what the model is also given at inference time, never on
anything derived from the gold query:

- the example's SQLite file when it has one (Spider rows);
- the rows a context carries as ``INSERT`` statements (gretel);
- otherwise an *empty* database built from the context's ``CREATE TABLE`` statements
  (sql-create-context rows, and every request to the served model). On empty tables "returns
  rows" says nothing (and would favour aggregates, which return a row of zeros), so there only
  "executes" counts: the candidate names existing tables and columns and is valid SQLite.
  (The judge's synthetic databases are not used: they are built from the gold query's
  literals, so choosing by them would let the answer leak into decoding.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from dataset_utils.records import Example
from evaluation.sandbox import SandboxDB
from evaluation.synth_db import has_inserts, inserts_setup, parse_schema, schema_ddl


@lru_cache(maxsize=1024)
def _setup(context: str) -> tuple[tuple[str, ...], bool]:
    """Setup statements for a context's database and whether it holds data."""
    if has_inserts(context):
        return tuple(inserts_setup(context)), True
    return tuple(schema_ddl(parse_schema(context))), False


def guidance_database(example: Example) -> tuple[SandboxDB, bool] | None:
    """The database candidates run on (see the module docstring) and whether it has rows;
    None when the example has neither a database nor a usable schema."""
    try:
        if example.db_path and Path(example.db_path).is_file():
            return SandboxDB.open(example.db_path), True
        if not example.context.strip():
            return None
        setup, has_rows = _setup(example.context)
        if not setup:
            return None
        return SandboxDB.from_script(setup), has_rows
    except (sqlite3.Error, ValueError, OSError):
        return None
    except Exception:  # noqa: BLE001 - e.g. sqlglot failing on a malformed context
        return None


def _returns_rows(rows: Sequence[Sequence[object]]) -> bool:
    return any(v is not None for row in rows for v in row)


def choose_candidate(example: Example, candidates: Sequence[str], *, timeout_s: float) -> int:
    """Index of the candidate execution guidance takes (see the module docstring)."""
    target = guidance_database(example)
    if target is None or not candidates:
        return 0
    db, has_rows = target
    first_ok: int | None = None
    seen: set[str] = set()
    with db:
        for i, sql in enumerate(candidates):
            if not sql.strip() or sql in seen:
                continue
            seen.add(sql)
            # One row past the first tells us enough; the time limit bounds the rest.
            res = db.run(sql, timeout_s=timeout_s, max_rows=1)
            if not res.ok:
                continue
            if not has_rows or _returns_rows(res.rows):
                return i
            if first_ok is None:
                first_ok = i
    return first_ok if first_ok is not None else 0
