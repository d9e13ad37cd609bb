"""Spider's hardness levels (easy / medium / hard / extra), by the official rules.

Spider's evaluation script (``evaluation.py`` in github.com/taoyds/spider, with the SQL parser
``process_sql.py``) puts every gold query in one of four levels by counting components of the
query's *first* SELECT (the part before any INTERSECT / UNION / EXCEPT):

- ``component1``: one each for WHERE, GROUP BY, ORDER BY, LIMIT present; one per joined table
  beyond the first (FROM subqueries count as tables); one per ``OR`` and per ``LIKE``
  condition in the ON, WHERE and HAVING conditions.
- ``component2``: nested queries -- subqueries on the value side of an ON / WHERE / HAVING
  condition, plus one for a following INTERSECT / UNION / EXCEPT.
- ``others``: one each for more than one aggregate, more than one selected column, more than
  one WHERE condition, more than one GROUP BY column.

and then::

    easy    c1 <= 1 and others == 0 and c2 == 0
    medium  (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0)
    hard    (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0)
            or (c1 <= 1 and others == 0 and c2 <= 1)
    extra   everything else

The aggregate count keeps the official script's exact behaviour, quirks included, because the
levels published for Spider come from it: it counts aggregates in the SELECT list, the GROUP BY
and ORDER BY columns, plus every negated (``NOT IN`` / ``NOT LIKE``...) WHERE or HAVING
condition and every AND / OR between HAVING conditions (its ``has_agg`` test reads the first
field of each unit, which for a condition is its NOT flag and for a connective is the string
``'and'``/``'or'``); an aggregate inside a WHERE or HAVING comparison is not counted.

This module reimplements those counts on a sqlglot parse tree (SQLite dialect); it does not
need the database schema. Agreement with the official script on every Spider train and dev
question is measured in the project README (Data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sqlglot
from sqlglot import exp

HARDNESS_LEVELS = ("easy", "medium", "hard", "extra")
# Part of the dataset cache key (levels are stored with cached examples): bump on any change
# that can move a query to another level.
HARDNESS_VERSION = "1"


@dataclass(frozen=True)
class HardnessCounts:
    """The three component counts of Spider's ``eval_hardness``."""

    component1: int
    component2: int
    others: int

    @property
    def level(self) -> str:
        return level_of(self.component1, self.component2, self.others)


def level_of(c1: int, c2: int, others: int) -> str:
    """Spider's ``eval_hardness`` decision on the three counts."""
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (
        (others > 2 and c1 <= 2 and c2 == 0)
        or (2 < c1 <= 3 and others <= 2 and c2 == 0)
        or (c1 <= 1 and others == 0 and c2 <= 1)
    ):
        return "hard"
    return "extra"


@lru_cache(maxsize=16384)
def hardness_counts(sql: str) -> HardnessCounts | None:
    """The component counts of ``sql``; None when it does not parse as one SELECT query."""
    try:
        trees = sqlglot.parse(sql, read="sqlite")
    except (sqlglot.errors.SqlglotError, RecursionError, ValueError):
        return None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        return None
    node = trees[0]
    # The official parser reads the first SELECT and hangs whatever follows an INTERSECT /
    # UNION / EXCEPT below it as one nested query (ORDER BY / LIMIT after the last SELECT
    # belong to that last SELECT, i.e. to the nested part).
    set_operation = False
    while isinstance(node, (exp.SetOperation, exp.Subquery, exp.Paren)):
        set_operation = set_operation or isinstance(node, exp.SetOperation)
        node = node.this
    if not isinstance(node, exp.Select):
        return None
    return _count(node, set_operation)


def spider_hardness(sql: str) -> str | None:
    """``easy`` / ``medium`` / ``hard`` / ``extra`` for ``sql``, or None when it does not parse."""
    counts = hardness_counts(sql)
    return counts.level if counts is not None else None


# --------------------------------------------------------------------------------------------
# Counting, on the official parser's structure: a condition is a list of units joined by
# 'and' / 'or'; a unit is (not_op, op, left, value1, value2).


@dataclass(frozen=True)
class _Unit:
    negated: bool
    like: bool
    nested: int  # subqueries among value1 / value2
    column_value: bool  # its (last) value is a column expression, not a literal or subquery


def _strip(node: object) -> object:
    while isinstance(node, (exp.Paren, exp.Alias)):
        node = node.this
    return node


def _flatten(cond: object, units: list[_Unit], ops: list[str]) -> None:
    """In-order leaves and connectives of an AND / OR tree (parentheses are transparent)."""
    cond = _strip(cond)
    if isinstance(cond, exp.And | exp.Or):
        _flatten(cond.this, units, ops)
        ops.append("and" if isinstance(cond, exp.And) else "or")
        _flatten(cond.expression, units, ops)
        return
    negated = isinstance(cond, exp.Not)
    inner = _strip(cond.this) if isinstance(cond, exp.Not) else cond
    if isinstance(inner, exp.Between):
        values = [inner.args.get("low"), inner.args.get("high")]
    elif isinstance(inner, exp.In):
        values = [inner.args.get("query")] + list(inner.expressions)
    elif isinstance(inner, exp.Binary):
        values = [inner.expression]
    else:
        values = []
    nested = sum(1 for v in values if isinstance(_strip(v), exp.Subquery | exp.Select))
    units.append(
        _Unit(
            negated=negated,
            like=isinstance(inner, exp.Like),
            nested=nested,
            column_value=bool(values) and _is_column_value(values[-1]),
        )
    )


def _is_column_value(value: object) -> bool:
    """Whether the official parser reads this value with its column fallback.

    Its tokenizer turns every quoted text into a string value (Spider writes strings in double
    quotes, which sqlglot reads as quoted identifiers), numbers parse as floats and ``(SELECT``
    starts a subquery; anything else is read as a column.
    """
    value = _strip(value)
    if isinstance(value, exp.Neg):
        value = _strip(value.this)
    if isinstance(value, exp.Literal | exp.Subquery | exp.Select):
        return False
    return not (isinstance(value, exp.Column) and value.this.args.get("quoted"))


def _condition(cond: object) -> tuple[list[_Unit], list[str]]:
    """Units and connectives of a condition, as the official parser reads them.

    Its column fallback scans ahead to the next ``,`` / ``)`` / ``AND`` / keyword, but not to
    ``OR``: in ``a < T2.jul OR a > T2.oct`` everything after the column value up to the next
    AND is taken as part of that value and dropped. Replicated, because the levels published
    for Spider depend on it (two train questions).
    """
    units: list[_Unit] = []
    ops: list[str] = []
    _flatten(cond, units, ops)
    kept_units, kept_ops = units[:1], []
    swallowing = bool(units) and units[0].column_value
    for op, unit in zip(ops, units[1:], strict=True):
        if swallowing and op == "or":
            continue
        kept_ops.append(op)
        kept_units.append(unit)
        swallowing = unit.column_value
    return kept_units, kept_ops


def _is_agg(node: object) -> bool:
    return isinstance(_strip(node), exp.Count | exp.Max | exp.Min | exp.Sum | exp.Avg)


def _count(select: object, set_operation: bool) -> HardnessCounts:
    assert isinstance(select, exp.Select)
    # FROM: every table or subquery, joined; the ON conditions joined by 'and'.
    from_ = select.args.get("from_") or select.args.get("from")
    joins = select.args.get("joins") or []
    n_tables = (1 if from_ is not None else 0) + len(joins)
    from_units: list[_Unit] = []
    from_ops: list[str] = []
    for join in joins:
        on = join.args.get("on")
        if on is None:
            continue
        if from_units:
            from_ops.append("and")
        units, ops = _condition(on)
        from_units += units
        from_ops += ops

    def condition(clause: str) -> tuple[list[_Unit], list[str]]:
        node = select.args.get(clause)
        return _condition(node.this) if node is not None else ([], [])

    where_units, where_ops = condition("where")
    having_units, having_ops = condition("having")
    group = select.args.get("group")
    group_cols = list(group.expressions) if group is not None else []
    order = select.args.get("order")
    order_cols = [o.this for o in order.expressions] if order is not None else []
    items = list(select.expressions)

    all_units = from_units + where_units + having_units
    all_ops = from_ops + where_ops + having_ops
    component1 = (
        int(bool(where_units))
        + int(bool(group_cols))
        + int(bool(order_cols))
        + int(select.args.get("limit") is not None)
        + max(n_tables - 1, 0)
        + all_ops.count("or")
        + sum(u.like for u in all_units)
    )
    component2 = sum(u.nested for u in all_units) + int(set_operation)

    aggregates = sum(_is_agg(i) for i in items)
    aggregates += sum(u.negated for u in where_units)
    aggregates += sum(_is_agg(c) for c in group_cols)
    for col in order_cols:
        col = _strip(col)
        # An ORDER BY unit is one column or two joined by + - * /: each side may aggregate.
        arithmetic = isinstance(col, exp.Add | exp.Sub | exp.Mul | exp.Div)
        sides = [col.this, col.expression] if arithmetic else [col]
        aggregates += sum(_is_agg(s) for s in sides)
    aggregates += sum(u.negated for u in having_units) + len(having_ops)
    others = (
        int(aggregates > 1)
        + int(len(items) > 1)
        + int(len(where_units) > 1)
        + int(len(group_cols) > 1)
    )
    return HardnessCounts(component1=component1, component2=component2, others=others)
