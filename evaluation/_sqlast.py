"""Small sqlglot helpers shared by the evaluation modules (internal).

- `parse_query`: parse one statement in the SQLite dialect, or None.
- `split_statements`: split a script into statements with SQLite's own tokenizer.
- `fix_double_quoted_strings`: SQLite reads ``"Linda"`` as a string literal when no column of
  that name exists (sql-create-context and Spider both rely on it); sqlglot parses it as a
  quoted identifier. This rewrites such identifiers into string literals, given the schema.
- `resolve_column`: which table(s) a column reference belongs to.
- `literal_value` / `make_literal`: Python values to and from sqlglot literals.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence

import sqlglot
from sqlglot import exp

DIALECT = "sqlite"


def parse_query(sql: str) -> exp.Expression | None:
    """Parse exactly one statement (SQLite dialect); None when it does not parse.

    Text sqlglot can only keep as an opaque ``Command`` counts as not parsed.
    """
    logger = logging.getLogger("sqlglot")
    level = logger.level
    # sqlglot logs a warning for every statement it falls back on; that is an answer
    # ("not parsed") here, not something to print once per example.
    logger.setLevel(logging.ERROR)
    try:
        trees = sqlglot.parse(sql, read=DIALECT)
    except (sqlglot.errors.SqlglotError, RecursionError, ValueError):
        return None
    finally:
        logger.setLevel(level)
    trees = [t for t in trees if t is not None]
    if len(trees) != 1 or isinstance(trees[0], exp.Command):
        return None
    return trees[0]


# A line starting a new DDL/DML statement: schema text rendered one table per line often has
# no semicolons (dataset_utils.schema, many prompts).
_STATEMENT_LINE = re.compile(r"\n(?=[ \t]*(?:CREATE|INSERT)\b)", re.IGNORECASE)


def split_statements(script: str) -> list[str]:
    """Split a SQL script at statement boundaries.

    Boundaries are semicolons that end a complete statement according to
    `sqlite3.complete_statement` (SQLite's tokenizer, so a ``;`` inside a string does not
    count), and -- for pieces that do not parse as one statement -- line breaks before a
    ``CREATE``/``INSERT`` keyword. A trailing statement without a semicolon is kept.
    """
    out: list[str] = []
    for piece in _split_semicolons(script):
        if "\n" in piece and parse_query(piece) is None:
            out.extend(p.strip() for p in _STATEMENT_LINE.split(piece) if p.strip())
        else:
            out.append(piece)
    return out


def _split_semicolons(script: str) -> list[str]:
    out: list[str] = []
    start = 0
    pos = script.find(";")
    while pos >= 0:
        candidate = script[start : pos + 1]
        if sqlite3.complete_statement(candidate):
            if candidate.strip(" \t\r\n;"):
                out.append(candidate.strip())
            start = pos + 1
        pos = script.find(";", pos + 1)
    tail = script[start:].strip()
    if tail:
        out.append(tail)
    return out


def fix_double_quoted_strings(tree: exp.Expression, known_columns: Iterable[str]) -> exp.Expression:
    """Turn unqualified double-quoted "identifiers" that name no column into string literals.

    Mirrors SQLite's fallback: ``WHERE name = "Linda"`` compares with the string 'Linda' unless
    a column called Linda exists. Mutates and returns ``tree``.
    """
    known = {c.lower() for c in known_columns}
    aliases = {a.alias.lower() for a in tree.find_all(exp.Alias) if a.alias}
    for col in list(tree.find_all(exp.Column)):
        ident = col.this
        if (
            isinstance(ident, exp.Identifier)
            and ident.quoted
            and not col.table
            and ident.name.lower() not in known
            and ident.name.lower() not in aliases
        ):
            col.replace(exp.Literal.string(ident.name))
    return tree


def table_aliases(select: exp.Expression) -> dict[str, str]:
    """alias-or-name (lower) -> table name (lower) for the tables directly in one SELECT."""
    out: dict[str, str] = {}
    sources: list[exp.Expression] = []
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is not None:
        sources.append(from_.this)
    for join in select.args.get("joins") or []:
        sources.append(join.this)
    for src in sources:
        if isinstance(src, exp.Table) and src.name:
            out[(src.alias_or_name or src.name).lower()] = src.name.lower()
            out.setdefault(src.name.lower(), src.name.lower())
    return out


def resolve_column(col: exp.Column, schema: Mapping[str, Sequence[str]]) -> list[str]:
    """Tables (lower-case names from ``schema``) that column reference ``col`` may belong to.

    ``schema`` maps lower-case table name -> column names. Qualified references resolve through
    the aliases of the enclosing SELECTs (innermost first); unqualified ones to the tables of
    the innermost enclosing SELECT that have such a column, else to any table that has it.
    """
    name = col.name.lower()
    qualifier = col.table.lower() if col.table else ""
    node: exp.Expression | None = col
    while node is not None:
        select = node.find_ancestor(exp.Select)
        if select is None:
            break
        aliases = table_aliases(select)
        if qualifier:
            if qualifier in aliases:
                return [aliases[qualifier]]
        else:
            hits = [
                t
                for t in dict.fromkeys(aliases.values())
                if name in {c.lower() for c in schema.get(t, ())}
            ]
            if hits:
                return hits
        node = select
    if qualifier and qualifier in schema:
        return [qualifier]
    return [t for t, cols in schema.items() if name in {c.lower() for c in cols}]


def literal_value(node: exp.Expression) -> str | int | float | None:
    """Python value of a literal (``Neg(Literal)`` included), else None."""
    negate = False
    if isinstance(node, exp.Neg):
        negate, node = True, node.this
    if isinstance(node, exp.Paren):
        return literal_value(node.this)
    if not isinstance(node, exp.Literal):
        return None
    if node.is_string:
        return None if negate else node.this
    text = node.this
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
    return -value if negate else value


def make_literal(value: str | int | float) -> exp.Expression:
    if isinstance(value, str):
        return exp.Literal.string(value)
    if value < 0:
        return exp.Neg(this=exp.Literal.number(-value))
    return exp.Literal.number(value)
