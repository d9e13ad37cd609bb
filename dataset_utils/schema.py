"""Read a database schema from a SQLite file and render it as compact SQL DDL.

Spider-style rows carry only a ``db_id``; the model needs the schema as text. We render it in
the same ``CREATE TABLE name (col TYPE, ...)`` style as sql-create-context so that every source
looks alike to the model, one line per table, with primary and foreign keys (joins need them).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_SIMPLE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_ident(name: str) -> str:
    """Quote an identifier only when SQLite needs it (spaces, punctuation, leading digit)."""
    if _SIMPLE_IDENT.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


SCHEMA_STYLES = ("ddl", "compact", "columns")
SQLITE_HEADER = b"SQLite format 3\x00"


def is_sqlite_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with SQLite's header."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as fh:
        return fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER


@dataclass(frozen=True)
class TableInfo:
    """One table as the renderer needs it (read from SQLite here, or from any SQLAlchemy
    database by `evaluation.databases`)."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (name, declared type)
    primary_key: tuple[str, ...] = ()
    # (column, referenced table, referenced column or "" for the referenced table's key)
    foreign_keys: tuple[tuple[str, str, str], ...] = ()


def render_schema(tables: list[TableInfo], style: str = "ddl") -> str:
    """Render tables as one ``CREATE TABLE`` line each (see `schema_from_sqlite` for styles)."""
    if style not in SCHEMA_STYLES:
        raise ValueError(f"unknown schema style {style!r}; expected one of {SCHEMA_STYLES}")
    lines = []
    for table in tables:
        parts = []
        for name, ctype in table.columns:
            ctype = (ctype or "").strip() if style == "ddl" else ""
            parts.append(f"{quote_ident(name)} {ctype}".rstrip())
        if style == "columns":
            lines.append(f"CREATE TABLE {quote_ident(table.name)} (" + ", ".join(parts) + ")")
            continue
        if table.primary_key and style == "ddl":
            parts.append(
                "PRIMARY KEY (" + ", ".join(quote_ident(c) for c in table.primary_key) + ")"
            )
        for src, ref_table, dst in table.foreign_keys:
            target = (
                f"{quote_ident(ref_table)}({quote_ident(dst)})" if dst else quote_ident(ref_table)
            )
            parts.append(f"FOREIGN KEY ({quote_ident(src)}) REFERENCES {target}")
        lines.append(f"CREATE TABLE {quote_ident(table.name)} (" + ", ".join(parts) + ")")
    return "\n".join(lines)


def sqlite_tables(db_path: str) -> list[TableInfo]:
    """The tables of a SQLite file, in creation order (opened read-only)."""
    uri = f"file:{Path(db_path).resolve()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
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
            pk = tuple(c[1] for c in sorted(cols, key=lambda c: c[5]) if c[5] > 0)
            # foreign_key_list rows: (id, seq, table, from, to, on_update, on_delete, match)
            fks = tuple(
                (fk[3], fk[2], fk[4] or "")
                for fk in conn.execute(f'PRAGMA foreign_key_list("{qt}")').fetchall()
            )
            tables.append(TableInfo(name, tuple((c[1], c[2] or "") for c in cols), pk, fks))
        return tables
    finally:
        conn.close()


@lru_cache(maxsize=256)
def schema_from_sqlite(db_path: str, style: str = "ddl") -> str:
    """Render the tables of a SQLite database as one ``CREATE TABLE`` line per table.

    Styles (all valid SQLite DDL, so the text can also build a database):

    - ``ddl``: column types, primary and foreign keys (~295 SmolLM2 tokens per Spider schema);
    - ``compact``: no types or primary keys, foreign keys kept -- joins need them (~185);
    - ``columns``: column names only (~115).

    The file is opened read-only; nothing is written.
    """
    if style not in SCHEMA_STYLES:
        raise ValueError(f"unknown schema style {style!r}; expected one of {SCHEMA_STYLES}")
    return render_schema(sqlite_tables(db_path), style)
