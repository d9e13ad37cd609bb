"""Read a database schema from a SQLite file and render it as compact SQL DDL for the prompt.

Spider-style rows carry only a ``db_id``; the model needs the schema as text. We render it in
the same ``CREATE TABLE name (col TYPE, ...)`` style as sql-create-context so that every source
looks alike to the model, one line per table, with primary and foreign keys (joins need them).

Prompt options (per source in the experiment YAML; all deterministic, the file is opened
read-only):

- ``schema_style``: ``ddl`` / ``compact`` / ``columns`` (see `schema_from_sqlite`);
- ``foreign_keys``: where the ``FOREIGN KEY`` clauses come from: the SQLite file's own
  declarations (``sqlite``), Spider's ``tables.json`` (``tables_json``), or nowhere
  (``none``); default: the style's (``sqlite`` for ddl/compact, ``none`` for columns);
- ``sample_values: N``: the first N distinct values of every column (in row order), as a
  comment after the column: ``name TEXT /* 'Joe Sharp', 'Timbaland' */``;
- ``max_tables: K``: for schemas with more than K tables, keep the K tables whose names and
  columns share the most words with the question (`relevant_tables`), plus any table that links
  two kept ones by foreign keys.

Every rendering stays valid SQLite DDL (comments included), so the text can also build a
database.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_SIMPLE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SCHEMA_STYLES = ("ddl", "compact", "columns")
FOREIGN_KEY_SOURCES = ("sqlite", "tables_json", "none")
# Sample values longer than this (characters) are not shown: long free text costs many prompt
# tokens and is rarely what a question filters on.
MAX_VALUE_CHARS = 40


def quote_ident(name: str) -> str:
    """Quote an identifier only when SQLite needs it (spaces, punctuation, leading digit)."""
    if _SIMPLE_IDENT.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with SQLite's header."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as fh:
        return fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER


@dataclass(frozen=True)
class ForeignKey:
    column: str
    ref_table: str
    ref_column: str | None


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, declared type)
    primary_key: tuple[str, ...]
    foreign_keys: tuple[ForeignKey, ...]  # as the SQLite file declares them


def _connect(db_path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)


@lru_cache(maxsize=512)
def read_tables(db_path: str) -> tuple[Table, ...]:
    """The tables of a SQLite file, in creation order, with their keys (read-only)."""
    conn = _connect(db_path)
    try:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            )
        ]
        tables = []
        for name in names:
            qt = name.replace('"', '""')
            cols = conn.execute(f'PRAGMA table_info("{qt}")').fetchall()
            # (id, seq, table, from, to, on_update, on_delete, match)
            fks = conn.execute(f'PRAGMA foreign_key_list("{qt}")').fetchall()
            tables.append(
                Table(
                    name=name,
                    columns=tuple((c[1], (c[2] or "").strip()) for c in cols),
                    primary_key=tuple(c[1] for c in sorted(cols, key=lambda c: c[5]) if c[5] > 0),
                    foreign_keys=tuple(ForeignKey(fk[3], fk[2], fk[4]) for fk in fks),
                )
            )
        return tuple(tables)
    finally:
        conn.close()


@lru_cache(maxsize=8)
def _tables_json(path: str) -> dict[str, tuple[tuple[str, str, str, str], ...]]:
    """Spider's ``tables.json``: db_id -> (table, column, ref_table, ref_column) per key."""
    out: dict[str, tuple[tuple[str, str, str, str], ...]] = {}
    for entry in json.loads(Path(path).read_text(encoding="utf-8")):
        tables = entry["table_names_original"]
        columns = entry["column_names_original"]
        keys = []
        for src, dst in entry.get("foreign_keys", []):
            (t_src, c_src), (t_dst, c_dst) = columns[src], columns[dst]
            keys.append((tables[t_src], c_src, tables[t_dst], c_dst))
        out[entry["db_id"]] = tuple(keys)
    return out


def tables_json_foreign_keys(tables_json: str, db_id: str) -> dict[str, tuple[ForeignKey, ...]]:
    """Foreign keys of ``db_id`` from Spider's ``tables.json``, by lower-cased table name."""
    keys = _tables_json(tables_json).get(db_id)
    if keys is None:
        raise KeyError(f"database {db_id!r} is not in {tables_json}")
    out: dict[str, list[ForeignKey]] = {}
    for table, column, ref_table, ref_column in keys:
        out.setdefault(table.lower(), []).append(ForeignKey(column, ref_table, ref_column))
    return {k: tuple(v) for k, v in out.items()}


@lru_cache(maxsize=4096)
def sample_values(db_path: str, table: str, column: str, n: int) -> tuple[object, ...]:
    """The first ``n`` distinct non-null values of a column, in row order (read-only).

    Text over `MAX_VALUE_CHARS` characters and blobs are skipped. Tables without a rowid
    take the smallest values instead.
    """
    if n <= 0:
        return ()
    qt, qc = table.replace('"', '""'), column.replace('"', '""')
    where = (
        f'"{qc}" IS NOT NULL AND typeof("{qc}") != \'blob\' '
        f'AND (typeof("{qc}") != \'text\' OR length("{qc}") <= {MAX_VALUE_CHARS})'
    )
    conn = _connect(db_path)
    try:
        try:
            rows = conn.execute(
                f'SELECT "{qc}" FROM "{qt}" WHERE {where} GROUP BY "{qc}" '
                f"ORDER BY min(rowid) LIMIT {int(n)}"
            ).fetchall()
        except sqlite3.OperationalError:  # WITHOUT ROWID
            rows = conn.execute(
                f'SELECT DISTINCT "{qc}" FROM "{qt}" WHERE {where} ORDER BY 1 LIMIT {int(n)}'
            ).fetchall()
        return tuple(r[0] for r in rows)
    finally:
        conn.close()


def _literal(value: object) -> str:
    if isinstance(value, str):
        # Inside a /* */ comment: a "*/" in the data must not end it.
        return "'" + value.replace("'", "''").replace("*/", "* /") + "'"
    return repr(value) if isinstance(value, float) else str(value)


@lru_cache(maxsize=1024)
def schema_from_sqlite(
    db_path: str,
    style: str = "ddl",
    *,
    foreign_keys: str | None = None,
    tables_json: str | None = None,
    db_id: str | None = None,
    sample_values_per_column: int = 0,
    keep_tables: tuple[str, ...] | None = None,
) -> str:
    """Render the tables of a SQLite database as one ``CREATE TABLE`` line per table.

    Styles (all valid SQLite DDL, so the text can also build a database):

    - ``ddl``: column types, primary and foreign keys (~295 SmolLM2 tokens per Spider schema);
    - ``compact``: no types or primary keys, foreign keys kept -- joins need them (~185);
    - ``columns``: column names only (~115).

    ``foreign_keys``: ``sqlite`` (the file's declarations), ``tables_json`` (Spider's
    ``tables.json`` at ``tables_json``, entry ``db_id``) or ``none``; None: the style's
    default. ``sample_values_per_column``: that many values per column as a comment
    (`sample_values`). ``keep_tables``: render only these tables (in schema order); foreign
    keys to other tables are left out. The file is opened read-only; nothing is written.
    """
    if style not in SCHEMA_STYLES:
        raise ValueError(f"unknown schema style {style!r}; expected one of {SCHEMA_STYLES}")
    if foreign_keys is None:
        foreign_keys = "none" if style == "columns" else "sqlite"
    if foreign_keys not in FOREIGN_KEY_SOURCES:
        raise ValueError(f"unknown foreign_keys {foreign_keys!r}; expected {FOREIGN_KEY_SOURCES}")
    tables = read_tables(db_path)
    if keep_tables is not None:
        kept = {t.lower() for t in keep_tables}
        tables = tuple(t for t in tables if t.name.lower() in kept)
    json_keys: dict[str, tuple[ForeignKey, ...]] = {}
    if foreign_keys == "tables_json":
        if tables_json is None or db_id is None:
            raise ValueError("foreign_keys='tables_json' needs tables_json and db_id")
        json_keys = tables_json_foreign_keys(tables_json, db_id)

    def keys(table: Table) -> tuple[ForeignKey, ...]:
        if foreign_keys == "sqlite":
            return table.foreign_keys
        if foreign_keys == "tables_json":
            return json_keys.get(table.name.lower(), ())
        return ()

    return render_schema(
        tables,
        style,
        keys=keys,
        values=lambda t, c: sample_values(db_path, t, c, sample_values_per_column),
        pruned=keep_tables is not None,
    )


def render_schema(
    tables: Sequence[Table],
    style: str = "ddl",
    *,
    keys: Callable[[Table], tuple[ForeignKey, ...]] | None = None,
    values: Callable[[str, str], tuple[object, ...]] | None = None,
    pruned: bool = False,
) -> str:
    """One ``CREATE TABLE`` line per table, in ``style`` (see `schema_from_sqlite`).

    The one renderer of every schema a prompt shows: SQLite files (`schema_from_sqlite`) and
    any SQLAlchemy database (`evaluation.databases`). ``keys``: the foreign keys shown per table
    (default: the table's own; none for ``columns``). ``values``: sample values per (table,
    column), shown as a comment. ``pruned``: leave out foreign keys to tables not rendered.
    """
    if style not in SCHEMA_STYLES:
        raise ValueError(f"unknown schema style {style!r}; expected one of {SCHEMA_STYLES}")
    if keys is None:
        keys = (lambda t: ()) if style == "columns" else (lambda t: t.foreign_keys)
    present = {t.name.lower() for t in tables}
    lines = []
    for table in tables:
        parts = []
        for name, ctype in table.columns:
            text = f"{quote_ident(name)} {ctype if style == 'ddl' else ''}".rstrip()
            shown = values(table.name, name) if values is not None else ()
            if shown:
                text += " /* " + ", ".join(_literal(v) for v in shown) + " */"
            parts.append(text)
        if table.primary_key and style == "ddl":
            key = ", ".join(quote_ident(c) for c in table.primary_key)
            parts.append(f"PRIMARY KEY ({key})")
        for fk in keys(table):
            if pruned and fk.ref_table.lower() not in present:
                continue  # pruned away
            ref = quote_ident(fk.ref_table)
            target = f"{ref}({quote_ident(fk.ref_column)})" if fk.ref_column else ref
            parts.append(f"FOREIGN KEY ({quote_ident(fk.column)}) REFERENCES {target}")
        lines.append(f"CREATE TABLE {quote_ident(table.name)} (" + ", ".join(parts) + ")")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pruning to the tables a question is about.

_WORD = re.compile(r"[A-Za-z]+|[0-9]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def _words(text: str) -> set[str]:
    """Lower-cased words, camelCase and snake_case split, a plural ``s`` dropped."""
    out = set()
    for word in _WORD.findall(_CAMEL.sub(" ", text)):
        w = word.lower()
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return out


def relevant_tables(db_path: str, question: str, max_tables: int) -> tuple[str, ...]:
    """The ``max_tables`` tables of the database most related to ``question``, lexically.

    Score: 3 per question word in the table's name, 1 per question word in its column names;
    ties keep schema order. A table whose foreign keys reach two kept tables (a link table such
    as ``has_pet`` between ``student`` and ``pets``) is kept as well. Returns every table when
    there are at most ``max_tables``; the result is in schema order.
    """
    tables = read_tables(db_path)
    if len(tables) <= max_tables:
        return tuple(t.name for t in tables)
    asked = _words(question)

    def score(table: Table) -> int:
        cols = set().union(*(_words(c) for c, _ in table.columns)) if table.columns else set()
        return 3 * len(asked & _words(table.name)) + len(asked & cols)

    ranked = sorted(range(len(tables)), key=lambda i: (-score(tables[i]), i))
    kept = {tables[i].name.lower() for i in ranked[:max_tables]}
    for table in tables:
        linked = {fk.ref_table.lower() for fk in table.foreign_keys} & kept
        if table.name.lower() not in kept and len(linked) >= 2:
            kept.add(table.name.lower())
    return tuple(t.name for t in tables if t.name.lower() in kept)
