"""Synthetic SQLite databases for judging SQL on schema-only datasets (test-suite style).

sql-create-context and Clinton rows carry only ``CREATE TABLE`` statements, no data, so a
prediction cannot be executed against "the" database. Following the idea of Spider's
test-suite evaluation (Zhong et al., 2020), we build several small random databases per
example whose contents are *aimed at the gold query*, and call a prediction correct only when
it returns the gold result on every one of them.

Generation strategy (deterministic given ``seed``; see `GENERATOR_VERSION`):

1. The context is parsed with `dataset_utils.schema.parse_tables` (the parser every schema
   reader shares). Dataset quirks are tolerated: every column ``VARCHAR``, columns without a
   type (the ``compact`` / ``columns`` prompt styles), quoted or reserved-word names (all
   identifiers are re-quoted), the same table defined twice (columns are merged),
   constraints (dropped, so random rows never violate them). Declared types are kept, so
   SQLite's type affinity -- and therefore how the gold query compares values -- is the same
   as on the original schema.
2. The gold query is analysed with sqlglot: literals compared with a column (``=``, ``<>``,
   ``<``, ``>``, ``LIKE``, ``IN``, ``BETWEEN``; also through ``LOWER(col)`` and the like) are
   attached to that column; columns equated with each other (join keys, ``IN (SELECT ...)``)
   share one small value pool so joins produce rows; columns in ``ORDER BY`` get distinct
   values so ties cannot make equivalent queries disagree; columns inside ``SUM``/``AVG`` or
   arithmetic get numbers. Double-quoted strings (``name = "Linda"``) count as literals when
   no such column exists, as in SQLite.
3. Each column draws values from: the gold literals and values that satisfy the comparison
   (``n+1`` for ``> n``; for a TEXT column compared with a number the comparison is textual,
   as in SQLite, and candidates are checked that way), *near misses* (``n-1``/``n``/``n+1``,
   other letter case, a truncated string, LIKE patterns expanded with and without the
   pattern), and random filler (numbers, words from a small vocabulary so ``GROUP BY`` and
   ``DISTINCT`` matter). Every database gets a "witness" row satisfying every literal
   condition plus near-miss rows that break one condition each, so a dropped or changed
   condition shows; ``HAVING COUNT(*) >= n`` gets a group of ``n`` witness rows. Databases
   differ in row counts, in which satisfying value the witness uses, and in the filler.
   No NULLs are generated: schema-only data says nothing about nullability, and on NULL-free
   data ``COUNT(col)`` equals ``COUNT(*)``, which is what "how many ..." questions mean
   (WikiSQL-derived gold writes ``COUNT(col)``; a model writing ``COUNT(*)`` is not wrong).
4. If the gold query returns nothing (or only NULLs) on a database, that database is redrawn
   (up to 3 times), since an empty gold result accepts any query that also returns nothing.

Built databases are cached under ``cache_dir("synth_db")`` keyed by a hash of (context, gold,
n, seed, `GENERATOR_VERSION`); bump the version whenever generation changes.

Where the context carries ``INSERT`` rows (gretel), no synthetic data is needed: the context is
executed as-is into one in-memory database (`inserts_setup`).

Usage::

    from evaluation.synth_db import synthetic_databases
    paths = synthetic_databases(example.context, example.sql, n=4, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from dataset_utils.schema import parse_tables
from dataset_utils.settings import cache_dir
from evaluation._sqlast import (
    fix_double_quoted_strings,
    literal_value,
    parse_query,
    resolve_column,
    split_statements,
)
from evaluation.sandbox import run_readonly

GENERATOR_VERSION = 5
DEFAULT_N_DBS = 4
_REDRAWS = 3

# Filler words: few enough that columns repeat values (GROUP BY, DISTINCT, COUNT matter),
# distinct from typical literals so a changed literal matches nothing by accident.
_WORDS = (
    "amber",
    "basalt",
    "cobalt",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "meadow",
    "nimbus",
    "onyx",
    "prairie",
    "quartz",
    "raven",
    "sierra",
    "tundra",
    "umber",
    "violet",
    "willow",
    "zephyr",
)

Key = tuple[str, str]  # (table, column), lower-case


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    affinity: str  # INTEGER | REAL | NUMERIC | TEXT | BLOB (SQLite's affinity rules)


@dataclass
class TableSpec:
    name: str
    columns: list[ColumnSpec] = field(default_factory=list)


def affinity_of(declared: str) -> str:
    """SQLite's column affinity for a declared type (rules of section 3.1 of datatype3)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not t or "BLOB" in t:
        return "BLOB"
    if any(s in t for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def parse_schema(context: str) -> dict[str, TableSpec]:
    """Tables declared by ``CREATE TABLE`` statements in ``context`` (lower-case name -> spec).

    Read by `dataset_utils.schema.parse_tables` (every prompt rendering, typeless columns,
    MySQL types, a table declared twice: columns merged). A declared type SQLite could not
    read back (``ENUM('a', 'b')``) is replaced by its affinity's name, so `schema_ddl` stays
    runnable and the affinity is unchanged.
    """
    tables: dict[str, TableSpec] = {}
    for table in parse_tables(context):
        columns = [
            ColumnSpec(name, _sqlite_type(declared), affinity_of(declared))
            for name, declared in table.columns
        ]
        tables[table.name.lower()] = TableSpec(name=table.name, columns=columns)
    return tables


# SQLite's type-name: identifiers, optionally followed by one or two signed numbers in
# parentheses (``VARCHAR(255)``, ``DECIMAL(4, 2)``, ``character varchar(3)``).
_SQLITE_TYPE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\s+[A-Za-z_][A-Za-z0-9_]*)*"
    r"(?:\s*\(\s*[+-]?\d+(?:\.\d+)?\s*(?:,\s*[+-]?\d+(?:\.\d+)?\s*)?\))?"
)
_AFFINITY_TYPE = {"INTEGER": "INTEGER", "TEXT": "TEXT", "REAL": "REAL", "NUMERIC": "NUMERIC"}


def _sqlite_type(declared: str) -> str:
    if not declared or _SQLITE_TYPE.fullmatch(declared):
        return declared
    return _AFFINITY_TYPE.get(affinity_of(declared), "")


def has_inserts(context: str) -> bool:
    """Whether the context carries data rows (``INSERT`` statements, as in gretel)."""
    return any(s.lstrip("( \t\r\n").upper().startswith("INSERT") for s in split_statements(context))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_ddl(tables: dict[str, TableSpec]) -> list[str]:
    """``CREATE TABLE`` statements for SQLite: all names quoted, declared types, no constraints."""
    return [
        f"CREATE TABLE {_quote(t.name)} ("
        + ", ".join(f"{_quote(c.name)} {c.type}".rstrip() for c in t.columns)
        + ")"
        for t in tables.values()
    ]


def inserts_setup(context: str) -> list[str]:
    """Setup statements for a context with ``INSERT`` rows, runnable by SQLite.

    Statements are kept as written when SQLite accepts them; others (MySQL/Postgres syntax in
    gretel) are transpiled to SQLite with sqlglot. Raises `sqlite3.Error` when the context
    cannot be executed even then.
    """
    conn = sqlite3.connect(":memory:")
    out: list[str] = []
    try:
        for stmt in split_statements(context):
            try:
                conn.execute(stmt)
                out.append(stmt)
                continue
            except sqlite3.Error as first:
                error = first
            try:
                converted = sqlglot.transpile(stmt, write="sqlite")
            except sqlglot.errors.SqlglotError:
                raise error from None
            for c in converted:
                conn.execute(c)
                out.append(c)
    finally:
        conn.close()
    return out


# -- gold query analysis --------------------------------------------------------------------


@dataclass
class GoldFacts:
    """What the gold query says about the data it needs (see the module docstring)."""

    conditions: dict[Key, list[tuple[str, Any]]] = field(default_factory=dict)
    links: list[set[Key]] = field(default_factory=list)
    numeric: set[Key] = field(default_factory=set)
    ordered: set[Key] = field(default_factory=set)
    grouped: set[Key] = field(default_factory=set)
    projected: set[Key] = field(default_factory=set)  # columns in any SELECT list
    # ``HAVING COUNT(*) >= n`` and the like: some group needs at least this many rows.
    min_group: int = 0

    def link(self, keys: Iterable[Key]) -> None:
        group = set(keys)
        if len(group) < 2:
            return
        merged = [g for g in self.links if g & group]
        for g in merged:
            self.links.remove(g)
            group |= g
        self.links.append(group)

    def group_of(self, key: Key) -> frozenset[Key] | None:
        for g in self.links:
            if key in g:
                return frozenset(g)
        return None


_FLIP = {"gt": "lt", "lt": "gt", "gte": "lte", "lte": "gte"}
_BINARY_OPS: dict[type[exp.Expression], str] = {
    exp.EQ: "eq",
    exp.NEQ: "neq",
    exp.GT: "gt",
    exp.GTE: "gte",
    exp.LT: "lt",
    exp.LTE: "lte",
    exp.Like: "like",
    exp.ILike: "like",
}


def _single_column(node: exp.Expression | None) -> exp.Column | None:
    """The one column inside ``node`` (``col``, ``LOWER(col)``, ``CAST(col AS ..)``), else None."""
    if node is None or isinstance(node, exp.Query | exp.Subquery):
        return None
    if isinstance(node, exp.Column):
        return node
    cols = list(node.find_all(exp.Column))
    if len(cols) == 1 and not any(isinstance(n, exp.Query) for n in node.find_all(exp.Query)):
        return cols[0]
    return None


_MAX_GROUP = 300


def _count_threshold(node: exp.Expression, op: str) -> int | None:
    """Rows a group needs for ``COUNT(..) <op> n`` to hold (None: not such a comparison)."""
    left, right = node.this, node.expression
    if isinstance(right, exp.Count):
        left, right = right, left
        op = {"gt": "lt", "lt": "gt", "gte": "lte", "lte": "gte"}.get(op, op)
    if not isinstance(left, exp.Count):
        return None
    n = literal_value(right)
    if not isinstance(n, int):
        return None
    need = {"gt": n + 1, "gte": n, "eq": n}.get(op, 0)
    return min(max(need, 0), _MAX_GROUP)


def analyse_gold(gold_sql: str, tables: dict[str, TableSpec]) -> GoldFacts:
    """Extract literals, join links, numeric and ORDER BY columns from the gold query."""
    facts = GoldFacts()
    tree = parse_query(gold_sql)
    if tree is None:
        return facts
    schema = {k: [c.name for c in t.columns] for k, t in tables.items()}
    fix_double_quoted_strings(tree, [c for cols in schema.values() for c in cols])

    def keys(col: exp.Column) -> list[Key]:
        return [(t, col.name.lower()) for t in resolve_column(col, schema)]

    def add(col: exp.Column, op: str, value: Any) -> None:
        if value is None:
            return
        for k in keys(col):
            facts.conditions.setdefault(k, []).append((op, value))

    for select in tree.find_all(exp.Select):
        for proj in select.expressions:
            for col in proj.find_all(exp.Column):
                facts.projected.update(keys(col))
    for node in tree.walk():
        op = _BINARY_OPS.get(type(node))
        if op is not None and _count_threshold(node, op) is not None:
            facts.min_group = max(facts.min_group, _count_threshold(node, op) or 0)
        elif op is not None:
            left, right = node.this, node.expression
            lcol, rcol = _single_column(left), _single_column(right)
            lval, rval = literal_value(right), literal_value(left)
            if lcol is not None and rcol is not None:
                facts.link([*keys(lcol), *keys(rcol)])
            elif lcol is not None and lval is not None:
                add(lcol, op, lval)
            elif rcol is not None and rval is not None:
                add(rcol, _FLIP.get(op, op), rval)
        elif isinstance(node, exp.In):
            col = _single_column(node.this)
            if col is None:
                continue
            for item in node.expressions:
                add(col, "eq", literal_value(item))
            query = node.args.get("query")
            inner = query.this if isinstance(query, exp.Subquery) else query
            if isinstance(inner, exp.Select) and inner.expressions:
                other = _single_column(inner.expressions[0])
                if other is not None:
                    facts.link([*keys(col), *keys(other)])
        elif isinstance(node, exp.Between):
            col = _single_column(node.this)
            if col is not None:
                add(col, "gte", literal_value(node.args["low"]))
                add(col, "lte", literal_value(node.args["high"]))
        elif isinstance(node, exp.Sum | exp.Avg | exp.Add | exp.Sub | exp.Mul | exp.Div):
            for col in node.find_all(exp.Column):
                facts.numeric.update(keys(col))
        elif isinstance(node, exp.Ordered) and isinstance(node.this, exp.Column):
            facts.ordered.update(keys(node.this))
        elif isinstance(node, exp.Group):
            for col in node.find_all(exp.Column):
                facts.grouped.update(keys(col))
    return facts


# -- value pools ----------------------------------------------------------------------------


def _is_number_text(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _like_examples(pattern: str) -> tuple[list[str], list[str]]:
    """(strings that match a LIKE pattern, near misses that do not)."""
    core = pattern.replace("%", "").replace("_", "a")
    hits = [
        pattern.replace("%", "").replace("_", "a"),
        pattern.replace("%", "zz").replace("_", "b"),
    ]
    misses = [core[:-1] if len(core) > 1 else "q", core[1:] if len(core) > 1 else "qq"]
    # A pattern anchored at one end: the core on the other side only does not match.
    if not pattern.startswith("%"):
        misses.append("zz" + core)
    if not pattern.endswith("%"):
        misses.append(core + "zz")
    return hits, [m for m in misses if m not in hits]


_NUMERIC_TESTS: dict[str, Any] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _sqlite_text(value: Any) -> str:
    # How SQLite renders a number stored into a TEXT-affinity column (integral floats keep .0).
    return repr(value) if isinstance(value, float) else str(value)


def _holds(op: str, candidate: Any, value: Any, text_mode: bool) -> bool:
    test = _NUMERIC_TESTS[op]
    if text_mode:
        # A TEXT-affinity column compared with a number: SQLite converts the number to text
        # and compares strings ('9' > '10'). Stored numbers are text as well.
        return bool(test(_sqlite_text(candidate), _sqlite_text(value)))
    return bool(test(candidate, value))


def _number_candidates(value: int | float) -> list[int | float]:
    step: int | float = 1 if isinstance(value, int) else 0.5
    out = [value, value + step, value - step, value + 10 * step, value - 10 * step]
    # Textual neighbours: '9.61' sorts just above '9.6', '1' just below '10'.
    if isinstance(value, int):
        out += [value * 10 + 1, value // 10 if abs(value) >= 10 else value - 1]
    else:
        out += [float(f"{value}1"), round(value * 10, 6)]
    return list(dict.fromkeys(out))


def satisfying_values(op: str, value: Any, *, text_mode: bool = False) -> list[Any]:
    """Values that make ``column <op> value`` true (nearest to the boundary first).

    ``text_mode``: the column has TEXT affinity, so a numeric literal is compared as text.
    """
    if isinstance(value, str):
        if op == "like":
            return _like_examples(value)[0]
        if op in ("gt", "gte"):
            return [value + "z"] if op == "gt" else [value]
        if op in ("lt", "lte"):
            return [value[:-1] if value else " "] if op == "lt" else [value]
        return [value] if op != "neq" else [value + "x"]
    if op not in _NUMERIC_TESTS:
        return [value]
    return [c for c in _number_candidates(value) if _holds(op, c, value, text_mode)][:3]


def near_miss_values(op: str, value: Any, *, text_mode: bool = False) -> list[Any]:
    """Values close to ``value`` that make ``column <op> value`` false (or differ from it)."""
    if isinstance(value, str):
        if op == "like":
            return _like_examples(value)[1]
        out = [value.upper(), value.lower(), value.title(), value[:-1], value + " x"]
        if op in ("neq", "lt", "gt"):
            out.insert(0, value)  # the boundary itself makes these false
        if _is_number_text(value):
            num = float(value)
            as_int = int(num) if num.is_integer() else None
            if as_int is not None:
                out += [str(as_int - 1), str(as_int + 1)]
            else:
                out += [str(num - 0.5), str(num + 0.5)]
        keep_self = op in ("neq", "lt", "gt")
        return [v for v in dict.fromkeys(out) if v and (v != value or keep_self)]
    if op not in _NUMERIC_TESTS:
        return [value]
    misses = [c for c in _number_candidates(value) if not _holds(op, c, value, text_mode)]
    if op == "eq":
        # For equality the interesting neighbours are value +- step, whatever they compare as.
        misses = _number_candidates(value)[1:3]
    return list(dict.fromkeys(misses))[:3]


@dataclass
class _ColumnPlan:
    kind: str  # int | real | text
    satisfying: list[Any]
    near: list[Any]
    pool: list[Any]
    distinct: bool


def _kind_for(spec: ColumnSpec, key: Key, facts: GoldFacts) -> str:
    values = [v for _op, v in facts.conditions.get(key, [])]
    if any(isinstance(v, str) and not _is_number_text(v) for v in values):
        return "text"
    if any(isinstance(v, float) for v in values) or spec.affinity == "REAL":
        return "real"
    if values or key in facts.numeric or spec.affinity in ("INTEGER", "NUMERIC"):
        return "int"
    return "text"


def _random_value(kind: str, rng: random.Random, lo: int = 0, hi: int = 40) -> Any:
    if kind == "int":
        return rng.randint(lo, hi)
    if kind == "real":
        return round(rng.uniform(lo, hi), 1)
    return rng.choice(_WORDS)


def _plans(
    tables: dict[str, TableSpec], facts: GoldFacts, rng: random.Random
) -> dict[Key, _ColumnPlan]:
    plans: dict[Key, _ColumnPlan] = {}
    group_pools: dict[frozenset[Key], list[Any]] = {}
    for tkey, table in tables.items():
        for col in table.columns:
            key = (tkey, col.name.lower())
            kind = _kind_for(col, key, facts)
            sat: list[Any] = []
            near: list[Any] = []
            text_mode = col.affinity == "TEXT"
            for op, value in facts.conditions.get(key, []):
                # A numeric literal on a text column still goes in as its text form.
                if kind == "text" and not isinstance(value, str):
                    value = str(value)
                sat += satisfying_values(op, value, text_mode=text_mode)
                near += near_miss_values(op, value, text_mode=text_mode)
            numbers = [v for v in sat + near if isinstance(v, int | float)]
            lo = int(min(numbers)) - 12 if numbers else 0
            hi = int(max(numbers)) + 12 if numbers else 40
            group = facts.group_of(key)
            if group is not None:
                # Join keys: one small shared pool so rows of different tables meet.
                if group not in group_pools:
                    base = [_random_value(kind, rng, 1, 6) for _ in range(4)]
                    group_pools[group] = list(dict.fromkeys(base))
                pool = group_pools[group]
            else:
                # Few words (GROUP BY / DISTINCT matter), more numbers (aggregates over
                # different row sets should differ).
                size = rng.randint(3, 6) if kind == "text" else rng.randint(8, 14)
                pool = list(dict.fromkeys(_random_value(kind, rng, lo, hi) for _ in range(size)))
            plans[key] = _ColumnPlan(
                kind=kind,
                satisfying=list(dict.fromkeys(sat)),
                near=list(dict.fromkeys(near)),
                pool=pool,
                distinct=key in facts.ordered and group is None,
            )
    # Linked columns also see each other's literals (a join key filtered by a literal).
    for group in facts.links:
        shared_sat = [v for k in group if k in plans for v in plans[k].satisfying]
        for k in group:
            if k in plans:
                extra = [v for v in shared_sat if v not in plans[k].pool]
                plans[k].pool = plans[k].pool + extra
    return plans


def _draw(plan: _ColumnPlan, rng: random.Random) -> Any:
    r = rng.random()
    if plan.satisfying and r < 0.3:
        return rng.choice(plan.satisfying)
    if plan.near and r < 0.6:
        return rng.choice(plan.near)
    return rng.choice(plan.pool)


def _distinct_values(plan: _ColumnPlan, n: int, rng: random.Random) -> list[Any]:
    seeds = list(dict.fromkeys(plan.satisfying + plan.near))
    rng.shuffle(seeds)
    out = seeds[:n]
    i = 0
    while len(out) < n:
        i += 1
        if plan.kind == "text":
            v: Any = f"{rng.choice(_WORDS)}{i}"
        elif plan.kind == "real":
            v = round(rng.uniform(-50, 150), 2)
        else:
            v = rng.randint(-50, 150)
        if v not in out:
            out.append(v)
    rng.shuffle(out)
    return out


def _table_rows(
    table: TableSpec,
    tkey: str,
    plans: dict[Key, _ColumnPlan],
    facts: GoldFacts,
    rng: random.Random,
    db_index: int,
) -> list[list[Any]]:
    n_rows = rng.randint(6, 12) if db_index == 0 else rng.randint(2, 10)
    keys = [(tkey, c.name.lower()) for c in table.columns]
    # Columns a witness row pins: literal conditions, GROUP BY keys and join keys (so the
    # witness rows land in one group and still join). Everything else is drawn per row, so
    # aggregates over witness rows differ (SUM vs AVG, MAX vs MIN) and dropping the WHERE
    # clause brings in rows with other values.
    pinned = [
        bool(plans[k].satisfying) or k in facts.grouped or facts.group_of(k) is not None
        for k in keys
    ]
    witness = []
    for k in keys:
        plan = plans[k]
        if plan.satisfying:
            # A different satisfying value per database where there is a choice.
            witness.append(plan.satisfying[db_index % len(plan.satisfying)])
        else:
            witness.append(_draw(plan, rng))

    def variant(overrides: dict[int, Any]) -> list[Any]:
        row = [
            w if pin else _draw(plans[k], rng)
            for w, pin, k in zip(witness, pinned, keys, strict=True)
        ]
        for j, v in overrides.items():
            row[j] = v
        return row

    copies = max(2, facts.min_group) if db_index % 2 == 0 else 2
    rows: list[list[Any]] = [list(witness)] + [variant({}) for _ in range(copies - 1)]
    # Near misses: the witness with one condition broken.
    for j, k in enumerate(keys):
        near = plans[k].near
        for miss in near[:2] if db_index == 0 else rng.sample(near, min(1, len(near))):
            rows.append(variant({j: miss}))
    if facts.min_group and db_index % 2 == 1:
        # Groups around the threshold on the other databases: ">= n" vs "> n" shows.
        rows += [variant({}) for _ in range(max(0, facts.min_group - 3))]
    while len(rows) < n_rows:
        rows.append([_draw(plans[k], rng) for k in keys])
    for j, k in enumerate(keys):
        if plans[k].distinct:
            for row, v in zip(rows, _distinct_values(plans[k], len(rows), rng), strict=True):
                row[j] = v
    rng.shuffle(rows)
    return rows


def _write_db(path: Path, tables: dict[str, TableSpec], data: dict[str, list[list[Any]]]) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        # Tiny pages: these databases hold a few dozen rows; keeps the cache small.
        conn.execute("PRAGMA page_size = 512")
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("BEGIN")
        for ddl in schema_ddl(tables):
            conn.execute(ddl)
        for tkey, table in tables.items():
            marks = ", ".join("?" for _ in table.columns)
            conn.executemany(f"INSERT INTO {_quote(table.name)} VALUES ({marks})", data[tkey])
        conn.execute("COMMIT")
    finally:
        conn.close()


def _informative(result_rows: Sequence[Sequence[Any]]) -> bool:
    return any(v is not None for row in result_rows for v in row)


def _sub_seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cache_key(context: str, gold_sql: str, n: int, seed: int) -> str:
    payload = json.dumps([GENERATOR_VERSION, context, gold_sql, n, seed])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _build(folder: Path, context: str, gold_sql: str, n: int, seed: int, timeout_s: float) -> None:
    tables = parse_schema(context)
    if not tables:
        raise ValueError("the context declares no CREATE TABLE with columns")
    for i in range(n):
        path = folder / f"db_{i}.sqlite"
        for attempt in range(_REDRAWS):
            rng = random.Random(_sub_seed(seed, context, gold_sql, i, attempt))
            # Analysis is cheap; redo it per attempt so pools are redrawn too.
            facts = analyse_gold(gold_sql, tables)
            plans = _plans(tables, facts, rng)
            data = {k: _table_rows(t, k, plans, facts, rng, i) for k, t in tables.items()}
            if path.exists():
                path.unlink()
            _write_db(path, tables, data)
            res = run_readonly(path, gold_sql, timeout_s=timeout_s)
            # A failing gold will fail on every draw (schema problem): stop redrawing.
            if not res.ok or _informative(res.rows):
                break


def synthetic_databases(
    context: str,
    gold_sql: str,
    *,
    n: int = DEFAULT_N_DBS,
    seed: int = 0,
    timeout_s: float = 2.0,
) -> list[Path]:
    """Paths of ``n`` synthetic SQLite databases for (context, gold), built once and cached.

    Raises `ValueError` when the context declares no table.
    """
    root = cache_dir("synth_db")
    key = cache_key(context, gold_sql, n, seed)
    final = root / key[:2] / key
    paths = [final / f"db_{i}.sqlite" for i in range(n)]
    if (final / "meta.json").is_file() and all(p.is_file() for p in paths):
        return paths
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        _build(tmp, context, gold_sql, n, seed, timeout_s)
        meta = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "gold": gold_sql}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            # Another worker finished first (keep its copy), or an incomplete leftover.
            if (final / "meta.json").is_file() and all(p.is_file() for p in paths):
                shutil.rmtree(tmp, ignore_errors=True)
                return paths
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Lost a race with another worker that renamed its complete copy in place.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths
