"""Rewrite gold SQL into the style the model is trained to write (``data.sql_style``).

``dealiased``: Spider's gold SQL names joined tables ``T1``, ``T2``... and qualifies columns with
those aliases (``SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 ON ...``). A small model
then has to remember which alias stands for which table while it writes each column, and its
most common error is a column put on the wrong alias (``no such column: T2.year``). Written
with table names (``SELECT stadium.name FROM concert JOIN stadium ON ...``) every column sits
next to the table whose ``CREATE TABLE`` line lists it.

The rewrite is syntactic (sqlglot) and conservative: SQL without table aliases is returned
byte-for-byte; a SELECT that uses one table twice (a self-join needs its aliases) or a column
that refers to an outer query's alias (a correlated subquery) leaves the statement unchanged.
`dealias_checked` also runs both statements on the example's database, when it has one, and
keeps the original unless both give the same rows.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import sqlglot
from sqlglot import exp

from dataset_utils.records import Example
from evaluation.sandbox import SandboxDB

SQL_STYLES = ("original", "dealiased")


def dealias(sql: str) -> str:
    """``sql`` with table aliases replaced by the tables' names (see the module docstring)."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except sqlglot.errors.SqlglotError:
        return sql
    if tree is None:
        return sql
    selects = list(tree.find_all(exp.Select))
    scopes: dict[int, dict[str, str]] = {}
    for sel in selects:
        tables = [t for t in sel.find_all(exp.Table) if t.find_ancestor(exp.Select) is sel]
        names = Counter(t.name.lower() for t in tables)
        if any(n > 1 for n in names.values()):
            return sql  # self-join: the aliases are needed
        scopes[id(sel)] = {t.alias.lower(): t.name for t in tables if t.alias}
    if not any(scopes.values()):
        return sql
    all_aliases = {a for m in scopes.values() for a in m}
    for sel in selects:
        aliases = scopes[id(sel)]
        for col in sel.find_all(exp.Column):
            if col.find_ancestor(exp.Select) is not sel or not col.table:
                continue
            q = col.table.lower()
            if q in aliases:
                col.set("table", exp.to_identifier(aliases[q]))
            elif q in all_aliases:
                return sql  # an outer query's alias: correlated subquery
        for t in sel.find_all(exp.Table):
            if t.find_ancestor(exp.Select) is sel and t.alias:
                t.set("alias", None)
    return tree.sql(dialect="sqlite")


def dealias_checked(example: Example, timeout_s: float = 2.0) -> Example:
    """`dealias` the example's gold SQL; with a database, only if the rows stay the same."""
    new = dealias(example.sql)
    if new == example.sql:
        return example
    if example.db_path:
        try:
            db = SandboxDB.open(example.db_path)
        except FileNotFoundError:
            return example
        with db:
            old_res = db.run(example.sql, timeout_s=timeout_s)
            new_res = db.run(new, timeout_s=timeout_s)
        if not (old_res.ok and new_res.ok and Counter(old_res.rows) == Counter(new_res.rows)):
            return example
    return dataclasses.replace(example, sql=new)


def apply_sql_style(rows: Sequence[Example], style: str) -> tuple[list[Example], int]:
    """The rows in ``style``, and how many were rewritten."""
    if style not in SQL_STYLES:
        raise ValueError(f"unknown sql_style {style!r}; expected one of {SQL_STYLES}")
    if style == "original":
        return list(rows), 0
    out = [dealias_checked(r) for r in rows]
    return out, sum(1 for a, b in zip(rows, out, strict=True) if a.sql != b.sql)
