"""Compare a predicted query's result with the gold query's result.

Policy (the same as Spider's test-suite evaluation, so numbers are comparable with published
execution accuracy):

- **Rows** are compared as multisets (order-insensitive, duplicates count) unless the gold
  query's *top level* has ``ORDER BY``; then the order of rows must match too. An ``ORDER BY``
  inside a subquery does not make the result ordered. Ties under the gold ``ORDER BY`` are a
  known source of false negatives (both here and in the test-suite evaluation); they are rare
  in Spider.
- **Columns**: the number of columns must match, but their *order* may differ. A question
  like "show the name and age" is answered by ``SELECT age, name`` just as well; the
  test-suite evaluation accepts column permutations for that reason. We search for a
  permutation of the predicted columns that makes the results equal (pruned by comparing
  each column's multiset of values, so the search is cheap). Column *names* never matter.
- **Values** are normalized before comparison: ``bool`` -> ``int``; floats are rounded to
  12 significant digits (``AVG`` computed in another order may differ in the last bits) and a
  float with an integral value equals the ``int`` (``1.0 == 1``). Text stays case-sensitive
  and ``'1'`` (text) differs from ``1`` (number), as SQLite itself distinguishes them.

Usage::

    from evaluation.execution import results_match, gold_is_ordered
    results_match(pred_rows, gold_rows, ordered=gold_is_ordered(gold_sql))
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import sqlglot
from sqlglot import exp

# Give up the permutation search beyond this many candidates: results that wide with that
# many look-alike columns are treated as not matching rather than hanging the evaluation.
_MAX_PERMUTATIONS = 5_000


def normalize_value(value: Any) -> Any:
    """Canonical form of one result value (see the module docstring)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"  # NaN != NaN would make every row with it unequal
        if math.isinf(value):
            return value
        rounded = float(f"{value:.12g}")
        if rounded.is_integer():
            return int(rounded)
        return rounded
    return value


def normalize_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    return [tuple(normalize_value(v) for v in row) for row in rows]


def _sort_key(value: Any) -> tuple[int, Any]:
    # Mixed types in one column (NULL, numbers, text, blobs) must still sort deterministically.
    if value is None:
        return (0, 0)
    if isinstance(value, int | float):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, bytes):
        return (3, value)
    return (4, repr(value))


def _column_signature(rows: Sequence[tuple[Any, ...]], j: int) -> tuple[tuple[int, Any], ...]:
    return tuple(sorted(_sort_key(r[j]) for r in rows))


def _candidate_permutations(
    pred: Sequence[tuple[Any, ...]], gold: Sequence[tuple[Any, ...]], width: int
) -> Iterator[tuple[int, ...]]:
    """Permutations p (gold column j <- pred column p[j]) whose columns agree as multisets."""
    if not gold:
        # Both empty (row counts are checked first): any order matches; identity will do.
        yield tuple(range(width))
        return
    gold_sigs = [_column_signature(gold, j) for j in range(width)]
    pred_sigs = [_column_signature(pred, j) for j in range(width)]
    candidates = [[i for i in range(width) if pred_sigs[i] == gold_sigs[j]] for j in range(width)]
    if any(not c for c in candidates):
        return
    # Identity first: the common case costs one comparison.
    if all(j in candidates[j] for j in range(width)):
        yield tuple(range(width))
    count = 0
    chosen: list[int] = []
    used: set[int] = set()

    def backtrack(j: int) -> Iterator[tuple[int, ...]]:
        nonlocal count
        if j == width:
            count += 1
            yield tuple(chosen)
            return
        for i in candidates[j]:
            if i in used or count >= _MAX_PERMUTATIONS:
                continue
            used.add(i)
            chosen.append(i)
            yield from backtrack(j + 1)
            chosen.pop()
            used.discard(i)

    yield from backtrack(0)


def results_match(
    pred_rows: Sequence[Sequence[Any]],
    gold_rows: Sequence[Sequence[Any]],
    *,
    ordered: bool,
    allow_column_permutation: bool = True,
) -> bool:
    """True when the predicted result equals the gold result under the module's policy."""
    pred = normalize_rows(pred_rows)
    gold = normalize_rows(gold_rows)
    if len(pred) != len(gold):
        return False
    if not gold:
        return True
    width = len(gold[0])
    if any(len(r) != width for r in pred) or any(len(r) != width for r in gold):
        return False

    def equal(p: list[tuple[Any, ...]]) -> bool:
        return p == gold if ordered else Counter(p) == Counter(gold)

    if not allow_column_permutation:
        return equal(pred)
    for perm in _candidate_permutations(pred, gold, width):
        permuted = (
            pred if perm == tuple(range(width)) else [tuple(r[i] for i in perm) for r in pred]
        )
        if equal(permuted):
            return True
    return False


def gold_is_ordered(gold_sql: str) -> bool:
    """Whether the gold query's top level has ``ORDER BY`` (so row order is compared)."""
    try:
        tree = sqlglot.parse_one(gold_sql, read="sqlite")
    except sqlglot.errors.SqlglotError:
        tree = None
    if tree is None:
        # Unparseable gold (rare): fall back to a textual test on the last ORDER BY's depth.
        return _textual_order_by(gold_sql)
    while isinstance(tree, exp.Subquery):
        tree = tree.this
    return bool(tree.args.get("order"))


def _textual_order_by(sql: str) -> bool:
    upper = sql.upper()
    pos = upper.rfind("ORDER BY")
    if pos < 0:
        return False
    # Top level only when the parentheses before it are balanced.
    return upper[:pos].count("(") == upper[:pos].count(")")
