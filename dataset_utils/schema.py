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
database, and `parse_tables` reads any of them back (the tables, columns, declared types and
keys the prompt shows): the schema-constrained decoder and the judge's synthetic databases
read the schema the model actually sees through it, whatever the source or rendering.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlglot.dialects.sqlite import SQLite
from sqlglot.errors import TokenError
from sqlglot.tokens import Token, TokenType

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
# Reading schema text back.

# Words that end a column's type and start its constraints (SQLite's column-constraint
# keywords, plus MySQL's that gretel / user contexts carry).
_COLUMN_CONSTRAINT_WORDS = frozenset(
    {
        "CONSTRAINT", "PRIMARY", "NOT", "NULL", "UNIQUE", "CHECK", "DEFAULT", "COLLATE",
        "REFERENCES", "GENERATED", "AS", "AUTOINCREMENT", "AUTO_INCREMENT", "COMMENT",
    }
)  # fmt: skip
# Words that start a table constraint (a table element that is no column).
_TABLE_CONSTRAINT_WORDS = frozenset({"CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"})
# MySQL's inline index definitions (``KEY idx (a)``): no column either.
_INDEX_WORDS = frozenset({"KEY", "INDEX", "FULLTEXT", "SPATIAL"})
_NAME_TOKENS = (TokenType.IDENTIFIER, TokenType.STRING)
_CREATE_LINE = re.compile(r"(?=\bCREATE\s)", re.IGNORECASE)


def _word(token: Token) -> str:
    """The first keyword of a token (``PRIMARY KEY`` is one token), upper-case; "" for quoted
    names, strings and numbers, which are never keywords."""
    if token.token_type in (*_NAME_TOKENS, TokenType.NUMBER) or not token.text:
        return ""
    return token.text.split()[0].upper()


def _tokenize(text: str) -> list[Token]:
    """SQLite's tokens of ``text`` (comments dropped). A piece that cannot be tokenized (an
    unterminated string or comment) is left out: the text is split before each ``CREATE`` and
    the pieces are tokenized one by one."""
    try:
        return SQLite().tokenize(text)
    except TokenError:
        pass
    out: list[Token] = []
    offset = 0
    for piece in _CREATE_LINE.split(text):
        try:
            tokens = SQLite().tokenize(piece)
        except TokenError:
            tokens = []
        for t in tokens:  # positions in ``text``, for the declared-type slices
            t.start += offset
            t.end += offset
        out.extend(tokens)
        offset += len(piece)
    return out


def _split_elements(tokens: Sequence[Token]) -> list[list[Token]]:
    """Comma-separated elements at parenthesis depth 0."""
    out: list[list[Token]] = [[]]
    depth = 0
    for t in tokens:
        if t.token_type == TokenType.COMMA and depth == 0:
            out.append([])
            continue
        if t.token_type == TokenType.L_PAREN:
            depth += 1
        elif t.token_type == TokenType.R_PAREN:
            depth -= 1
        out[-1].append(t)
    return [e for e in out if e]


def _names_in_parens(tokens: Sequence[Token], start: int) -> tuple[list[str], int]:
    """The names in the parenthesized list at ``tokens[start]`` and the index after it."""
    if start >= len(tokens) or tokens[start].token_type != TokenType.L_PAREN:
        return [], start
    names: list[str] = []
    i = start + 1
    while i < len(tokens) and tokens[i].token_type != TokenType.R_PAREN:
        if tokens[i].token_type != TokenType.COMMA:
            names.append(tokens[i].text)
        i += 1
    return names, i + 1


def _reference(tokens: Sequence[Token], i: int) -> tuple[str, list[str]] | None:
    """``REFERENCES table [(columns)]`` at ``tokens[i]`` (the word after REFERENCES)."""
    if i >= len(tokens):
        return None
    table = tokens[i].text
    while i + 2 < len(tokens) and tokens[i + 1].token_type == TokenType.DOT:
        i += 2  # schema.table
        table = tokens[i].text
    columns, _ = _names_in_parens(tokens, i + 1)
    return table, columns


def _parse_create_body(
    text: str, elements: list[list[Token]]
) -> tuple[list[tuple[str, str]], list[str], list[ForeignKey]]:
    columns: list[tuple[str, str]] = []
    primary: list[str] = []
    keys: list[ForeignKey] = []
    for el in elements:
        first = _word(el[0])
        if first in _TABLE_CONSTRAINT_WORDS:
            # One element may hold several constraints: SQLite lets the comma between table
            # constraints out (``FOREIGN KEY (a) REFERENCES x(a) FOREIGN KEY (b) ...``).
            k = 0
            while k < len(el):
                word = _word(el[k])
                if word == "PRIMARY":
                    primary, k = _names_in_parens(el, k + 1)
                    continue
                if word == "FOREIGN":
                    own, k = _names_in_parens(el, k + 1)
                    if k < len(el) and _word(el[k]) == "REFERENCES":
                        ref = _reference(el, k + 1)
                        if ref is not None:
                            table, theirs = ref
                            for n, column in enumerate(own):
                                target = theirs[n] if n < len(theirs) else None
                                keys.append(ForeignKey(column, table, target))
                    continue
                k += 1
            continue
        if first in _INDEX_WORDS and any(
            t.token_type == TokenType.L_PAREN
            and k + 1 < len(el)
            and el[k + 1].token_type != TokenType.NUMBER
            for k, t in enumerate(el[:3])
        ):
            continue  # KEY idx (a): an index, not a column called "key"
        name = el[0].text
        end = 1
        depth = 0
        while end < len(el):
            t = el[end]
            if depth == 0 and _word(t) in _COLUMN_CONSTRAINT_WORDS:
                break
            depth += t.token_type == TokenType.L_PAREN
            depth -= t.token_type == TokenType.R_PAREN
            end += 1
        declared = text[el[1].start : el[end - 1].end + 1].strip() if end > 1 else ""
        if name.lower() not in {c.lower() for c, _ in columns}:  # SQLite: an error
            columns.append((name, declared))
        for k in range(end, len(el)):
            word = _word(el[k])
            if word == "PRIMARY":
                primary = [name]
            elif word == "REFERENCES":
                ref = _reference(el, k + 1)
                if ref is not None:
                    keys.append(ForeignKey(name, ref[0], ref[1][0] if ref[1] else None))
    # Key columns as the column list spells them (SQLite's PRAGMAs do the same).
    spelled = {c.lower(): c for c, _ in columns}
    primary = [spelled.get(c.lower(), c) for c in primary]
    keys = [
        ForeignKey(spelled.get(k.column.lower(), k.column), k.ref_table, k.ref_column) for k in keys
    ]
    return columns, primary, keys


def parse_tables(text: str) -> tuple[Table, ...]:
    """The tables declared by the ``CREATE TABLE`` statements of a schema text, in order.

    Reads back every rendering of `schema_from_sqlite` exactly (names, declared types as
    written, primary and foreign keys; sample-value comments skipped): for a database file,
    ``parse_tables(schema_from_sqlite(db, "ddl")) == read_tables(db)``. Tolerant of what user
    contexts carry: no semicolons between statements, columns without a type, quoted names
    (``"x"``, `` `x` ``, ``[x]``, ``'x'``), MySQL types and clauses, ``INSERT`` and other
    statements (skipped), a table declared twice (its columns merged), and a piece that cannot
    even be tokenized (skipped). ``CREATE TABLE ... AS SELECT``, views and virtual tables
    declare no column list and are not returned. Names keep their spelling; compare them
    case-insensitively, as SQLite does.
    """
    tokens = _tokenize(text)
    tables: dict[str, Table] = {}
    i = 0
    while i < len(tokens):
        if tokens[i].token_type != TokenType.CREATE:
            i += 1
            continue
        j = i + 1
        if j < len(tokens) and _word(tokens[j]) in ("TEMP", "TEMPORARY"):
            j += 1
        if j >= len(tokens) or tokens[j].token_type != TokenType.TABLE:
            i = j
            continue
        j += 1
        if j + 2 < len(tokens) and [_word(t) for t in tokens[j : j + 3]] == ["IF", "NOT", "EXISTS"]:
            j += 3
        if j >= len(tokens):
            break
        name = tokens[j].text
        while j + 2 < len(tokens) and tokens[j + 1].token_type == TokenType.DOT:
            j += 2
            name = tokens[j].text
        j += 1
        if j >= len(tokens) or tokens[j].token_type != TokenType.L_PAREN:
            i = j  # AS SELECT, or not a table after all
            continue
        # The body: up to the matching parenthesis (or, if the text was cut, the next
        # statement).
        body: list[Token] = []
        depth = 1
        j += 1
        while j < len(tokens) and tokens[j].token_type not in (
            TokenType.SEMICOLON,
            TokenType.CREATE,
        ):
            t = tokens[j]
            depth += t.token_type == TokenType.L_PAREN
            depth -= t.token_type == TokenType.R_PAREN
            if depth == 0:
                break
            body.append(t)
            j += 1
        i = j
        columns, primary, keys = _parse_create_body(text, _split_elements(body))
        if not columns:
            continue
        old = tables.get(name.lower())
        if old is not None:  # declared twice: one table with the columns of both
            have = {c.lower() for c, _ in old.columns}
            columns = [*old.columns, *(c for c in columns if c[0].lower() not in have)]
            primary = list(old.primary_key) or primary
            keys = [*old.foreign_keys, *keys]
            name = old.name
        tables[name.lower()] = Table(name, tuple(columns), tuple(primary), tuple(keys))
    return tuple(tables.values())


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
