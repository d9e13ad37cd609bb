"""String-level SQL metrics: normalization, exact match, validity and corpus BLEU.

These complement execution accuracy (`evaluation.judge`), which is the metric that matters;
exact match and BLEU are kept for continuity with the Determined text-to-SQL recipe.

`normalize_sql` parses with sqlglot (SQLite dialect) and regenerates canonical SQL:

- keywords upper-case, whitespace collapsed, ``!=`` -> ``<>``, trailing ``;`` dropped;
- unquoted identifiers lower-cased (SQLite identifiers are case-insensitive); quoted ones are
  kept as written, since ``"Linda"`` may be a string literal in SQLite;
- table aliases replaced by the table name where that is unambiguous (each alias names one
  table and each table has one alias across the whole query: no self-joins, no correlated
  re-aliasing), and column qualifiers dropped inside single-table SELECTs;
- output-column aliases (``COUNT(*) AS cnt``) dropped unless referenced elsewhere.

With ``known_columns`` (the schema's column names) double-quoted strings that name no column
become ordinary string literals, so ``name = "Linda"`` and ``name = 'Linda'`` normalize alike.
String literals keep their case. SQL that does not parse is compared after whitespace collapse.

Note: this is canonical-string exact match, *not* Spider's component-wise "exact set match".

Usage::

    from evaluation.sql_metrics import exact_match, bleu
    exact_match("select name from singer", "SELECT T1.name FROM singer AS T1")  # True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sqlglot import exp

from evaluation._sqlast import DIALECT, fix_double_quoted_strings, parse_query

_WS = re.compile(r"\s+")
# Root node types that are whole SQL statements (a bare expression is not one).
_STATEMENTS = (
    exp.Query,
    exp.DML,
    exp.DDL,
    exp.Drop,
    exp.Pragma,
    exp.Attach,
    exp.Detach,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
)


def _unalias_tables(tree: exp.Expression) -> None:
    tables = [t for t in tree.find_all(exp.Table) if t.name]
    alias_to_tables: dict[str, set[str]] = {}
    table_to_aliases: dict[str, set[str]] = {}
    for t in tables:
        alias = (t.alias or "").lower()
        table_to_aliases.setdefault(t.name.lower(), set()).add(alias)
        if alias:
            alias_to_tables.setdefault(alias, set()).add(t.name.lower())
    renames: dict[str, str] = {}
    for alias, names in alias_to_tables.items():
        (name,) = names if len(names) == 1 else (None,)
        if name is not None and table_to_aliases[name] == {alias} and alias not in table_to_aliases:
            renames[alias] = name
    if not renames:
        return
    for col in tree.find_all(exp.Column):
        if col.table and col.table.lower() in renames:
            col.set("table", exp.to_identifier(renames[col.table.lower()]))
    for t in tables:
        if t.alias and t.alias.lower() in renames:
            t.set("alias", None)


def _drop_single_table_qualifiers(tree: exp.Expression) -> None:
    for select in tree.find_all(exp.Select):
        from_ = select.args.get("from_") or select.args.get("from")
        if from_ is None or select.args.get("joins") or not isinstance(from_.this, exp.Table):
            continue
        source = from_.this.alias_or_name.lower()
        for col in select.find_all(exp.Column):
            if (
                col.table
                and col.table.lower() == source
                and col.find_ancestor(exp.Select) is select
            ):
                col.set("table", None)


def _drop_unused_column_aliases(tree: exp.Expression) -> None:
    referenced = {c.name.lower() for c in tree.find_all(exp.Column) if not c.table}
    for select in tree.find_all(exp.Select):
        for i, proj in enumerate(select.expressions):
            if isinstance(proj, exp.Alias) and proj.alias.lower() not in referenced:
                select.expressions[i] = proj.this
                proj.this.parent = select


def normalize_sql(sql: str, *, known_columns: Iterable[str] | None = None) -> str:
    """Canonical SQLite SQL for comparison (see the module docstring)."""
    text = sql.strip().rstrip(";").strip()
    tree = parse_query(text)
    if tree is None:
        return _WS.sub(" ", text)
    try:
        if known_columns is not None:
            fix_double_quoted_strings(tree, known_columns)
        _unalias_tables(tree)
        _drop_single_table_qualifiers(tree)
        _drop_unused_column_aliases(tree)
        return tree.sql(dialect=DIALECT, normalize=True)
    except Exception:  # noqa: BLE001 - a generator edge case must not break scoring
        return _WS.sub(" ", text)


def exact_match(pred: str, gold: str, *, known_columns: Iterable[str] | None = None) -> bool:
    """Whether the two queries are identical after `normalize_sql`."""
    if not pred or not pred.strip():
        return False
    cols = list(known_columns) if known_columns is not None else None
    return normalize_sql(pred, known_columns=cols) == normalize_sql(gold, known_columns=cols)


def is_valid_sql(sql: str) -> bool:
    """Whether ``sql`` parses (SQLite dialect) as exactly one SQL statement.

    A bare expression (``hello world`` parses as a column alias) or a statement sqlglot can
    only keep as an opaque command does not count.
    """
    if not sql or not sql.strip():
        return False
    tree = parse_query(sql.strip())
    if tree is None:
        return False
    if not isinstance(tree, _STATEMENTS):
        return False
    # sqlglot accepts a bare "SELECT"; SQLite does not.
    return all(s.expressions for s in tree.find_all(exp.Select))


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization), 0-100; 0.0 for no pairs."""
    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        return 0.0
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)
