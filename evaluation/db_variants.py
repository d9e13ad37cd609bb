"""Test-suite variants of a real database (Spider-style), aimed at one gold query.

On a single real database many wrong queries return the right answer by accident: a WHERE
that filters nothing, ``age > 21`` where nobody is 21, a column swap on an empty result.
Spider's test-suite evaluation (Zhong et al., 2020) therefore judges on a *suite* of databases
derived from the original. We do the same, in the same spirit:

1. **Subsample** (per database, cached per process): each variant keeps a random fraction of
   every table's rows (50%, 25%, 75%, ... by variant), then restores referential integrity
   *upward*: every parent row referenced through a declared ``FOREIGN KEY`` by a kept child
   row is kept too (to a fixpoint). The base variants invent no rows, so values, types,
   NULLs and key uniqueness are those of the real data.
2. **Aim at the gold query** (per example, in memory; columns and literals come from
   `evaluation.synth_db.analyse_gold`):

   - *duplicates*: each selected non-key column gets one repeated value (a missing
     ``DISTINCT`` shows);
   - *witnesses*: two rows of each filtered table get values satisfying all of that table's
     literal conditions, and their selected columns get values no other row has (so
     ``DISTINCT``/``INTERSECT`` cannot hide them and ``MAX``/``MIN`` or ``SUM``/``AVG`` over
     them differ); each variant uses a different satisfying value (``21`` for ``> 20``...);
   - *near misses*: for each condition, a row with every other condition satisfied and this
     one just broken (``n``/``n-1``, other letter case, truncated string, broken LIKE);
   - *join witnesses*: along the gold's join conditions, rows of the joined tables are
     pointed at the witnesses, so the filtered rows actually join.

   Keys are respected: a column other tables reference is never changed; a foreign-key column
   only takes values its parent has (the parent row is copied back from the real database if
   subsampling dropped it); an update that would duplicate a unique/primary key is skipped.

Usage::

    from evaluation.db_variants import suite_variants
    blobs = suite_variants(db_path, gold_sql, n=3, seed=0)   # serialized SQLite databases
    # SandboxDB.from_bytes(blob) opens one, locked down.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from evaluation.synth_db import (
    ColumnSpec,
    GoldFacts,
    TableSpec,
    affinity_of,
    analyse_gold,
    near_miss_values,
    satisfying_values,
)

SUITE_VERSION = 3
DEFAULT_SUITE_SIZE = 3
_KEEP_FRACTIONS = (0.5, 0.25, 0.75, 0.35, 0.6)


@dataclass
class _DbInfo:
    tables: dict[str, TableSpec]
    real_names: dict[str, str]  # lower -> name as declared
    key_columns: set[tuple[str, str]]  # (table, column) lower: PK, UNIQUE, FK either side
    fks: list[tuple[str, str, str, str]]  # (child, child_col, parent, parent_col), lower
    has_rowid: dict[str, bool] = field(default_factory=dict)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _inspect(conn: sqlite3.Connection) -> _DbInfo:
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY rowid"
        )
    ]
    tables: dict[str, TableSpec] = {}
    real: dict[str, str] = {}
    keys: set[tuple[str, str]] = set()
    fks: list[tuple[str, str, str, str]] = []
    has_rowid: dict[str, bool] = {}
    for name in names:
        t = name.lower()
        real[t] = name
        cols = conn.execute(f"PRAGMA table_info({_q(name)})").fetchall()
        tables[t] = TableSpec(
            name=name,
            columns=[ColumnSpec(c[1], c[2] or "", affinity_of(c[2] or "")) for c in cols],
        )
        keys.update((t, c[1].lower()) for c in cols if c[5] > 0)
        for idx in conn.execute(f"PRAGMA index_list({_q(name)})").fetchall():
            if idx[2]:  # unique
                for info in conn.execute(f"PRAGMA index_info({_q(idx[1])})").fetchall():
                    if info[2]:
                        keys.add((t, info[2].lower()))
        for fk in conn.execute(f"PRAGMA foreign_key_list({_q(name)})").fetchall():
            parent, src, dst = fk[2].lower(), fk[3], fk[4]
            if dst is None:
                # REFERENCES parent without a column: the parent's primary key.
                parent_pk = [
                    c[1]
                    for c in sorted(
                        conn.execute(f"PRAGMA table_info({_q(fk[2])})").fetchall(),
                        key=lambda c: c[5],
                    )
                    if c[5] > 0
                ]
                dst = parent_pk[0] if parent_pk else None
            if src is None:
                continue
            keys.add((t, src.lower()))
            if dst is not None:
                keys.add((parent, dst.lower()))
                fks.append((t, src.lower(), parent, dst.lower()))
        try:
            conn.execute(f"SELECT rowid FROM {_q(name)} LIMIT 1").fetchall()
            has_rowid[t] = True
        except sqlite3.Error:
            has_rowid[t] = False  # WITHOUT ROWID: left whole
    return _DbInfo(tables, real, keys, fks, has_rowid)


def _load(db_path: str) -> sqlite3.Connection:
    uri = f"file:{quote(str(Path(db_path).resolve()))}?mode=ro&immutable=1"
    src = sqlite3.connect(uri, uri=True)
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        src.backup(mem)
    finally:
        src.close()
    return mem


def _subsample(
    conn: sqlite3.Connection, info: _DbInfo, fraction: float, rng: random.Random
) -> None:
    """Keep ~fraction of each table's rows plus every parent row a kept row references."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    keep: dict[str, set[int]] = {}
    for t, spec in info.tables.items():
        if not info.has_rowid.get(t):
            continue
        cur = conn.execute(f"SELECT rowid, * FROM {_q(spec.name)}")
        cols = [d[0].lower() for d in cur.description][1:]
        rows[t] = {r[0]: dict(zip(cols, r[1:], strict=True)) for r in cur.fetchall()}
        ids = sorted(rows[t])
        chosen = {i for i in ids if rng.random() < fraction}
        if ids and not chosen:
            chosen = {rng.choice(ids)}
        keep[t] = chosen
    changed = True
    while changed:
        changed = False
        for child, ccol, parent, pcol in info.fks:
            if child not in keep or parent not in keep:
                continue
            # Values compared as text: Spider keys are sometimes TEXT on one side and
            # INTEGER on the other, which SQLite's affinity rules still join.
            wanted = {
                str(rows[child][i].get(ccol))
                for i in keep[child]
                if rows[child][i].get(ccol) is not None
            }
            for i, row in rows[parent].items():
                if i not in keep[parent] and str(row.get(pcol)) in wanted:
                    keep[parent].add(i)
                    changed = True
    for t, ids in keep.items():
        drop = [(i,) for i in rows[t] if i not in ids]
        conn.executemany(f"DELETE FROM {_q(info.tables[t].name)} WHERE rowid = ?", drop)


_BASE_CACHE: OrderedDict[tuple[Any, ...], tuple[_DbInfo, list[bytes]]] = OrderedDict()
_BASE_CACHE_SIZE = 32
_SUITE_CACHE: OrderedDict[str, list[bytes]] = OrderedDict()
_SUITE_CACHE_SIZE = 16


def _identity(db_path: str) -> tuple[str, int, int]:
    p = Path(db_path).resolve()
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns)


def base_variants(db_path: str, *, n: int, seed: int) -> tuple[_DbInfo, list[bytes]]:
    """Schema info and ``n`` subsampled copies of a database (serialized), cached."""
    key = (_identity(db_path), n, seed, SUITE_VERSION)
    if key in _BASE_CACHE:
        _BASE_CACHE.move_to_end(key)
        return _BASE_CACHE[key]
    out: list[bytes] = []
    info: _DbInfo | None = None
    for i in range(n):
        conn = _load(db_path)
        try:
            info = info or _inspect(conn)
            rng = random.Random(_seed("base", key[0], seed, i))
            _subsample(conn, info, _KEEP_FRACTIONS[i % len(_KEEP_FRACTIONS)], rng)
            out.append(conn.serialize())
        finally:
            conn.close()
    if info is None:
        conn = _load(db_path)
        try:
            info = _inspect(conn)
        finally:
            conn.close()
    _BASE_CACHE[key] = (info, out)
    if len(_BASE_CACHE) > _BASE_CACHE_SIZE:
        _BASE_CACHE.popitem(last=False)
    return info, out


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class _Injector:
    """Applies witness / near-miss / join-witness updates to one variant (see module doc)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        info: _DbInfo,
        rng: random.Random,
        variant: int,
        real: sqlite3.Connection,
    ) -> None:
        self.conn = conn
        self.real = real
        self.info = info
        self.rng = rng
        self.variant = variant
        self.parent_keys = {(p, pc) for _c, _cc, p, pc in info.fks}
        self.child_fk = {(c, cc): (p, pc) for c, cc, p, pc in info.fks}
        self.rowids: dict[str, list[int]] = {}
        self.witness_like: dict[str, list[int]] = {}

    def name(self, table: str) -> str:
        return self.info.tables[table].name

    def column(self, table: str, col: str) -> ColumnSpec | None:
        return next((c for c in self.info.tables[table].columns if c.name.lower() == col), None)

    def ids(self, table: str) -> list[int]:
        if table not in self.rowids:
            self.rowids[table] = [
                r[0] for r in self.conn.execute(f"SELECT rowid FROM {_q(self.name(table))}")
            ]
        return self.rowids[table]

    def values(self, table: str, col: str) -> list[Any]:
        spec = self.column(table, col)
        if spec is None:
            return []
        return [
            r[0] for r in self.conn.execute(f"SELECT {_q(spec.name)} FROM {_q(self.name(table))}")
        ]

    def get(self, table: str, rowid: int, col: str) -> Any:
        spec = self.column(table, col)
        assert spec is not None
        row = self.conn.execute(
            f"SELECT {_q(spec.name)} FROM {_q(self.name(table))} WHERE rowid = ?", (rowid,)
        ).fetchone()
        return row[0] if row else None

    def modifiable(self, table: str, col: str) -> bool:
        # Keys other tables point at must keep their values, or joins would break.
        return (
            (table, col) not in self.parent_keys
            and self.info.has_rowid.get(table, False)
            and self.column(table, col) is not None
        )

    def set(self, table: str, rowid: int, col: str, value: Any) -> bool:
        spec = self.column(table, col)
        if spec is None:
            return False
        try:
            self.conn.execute(
                f"UPDATE {_q(self.name(table))} SET {_q(spec.name)} = ? WHERE rowid = ?",
                (value, rowid),
            )
        except sqlite3.IntegrityError:
            return False  # would duplicate a unique/primary key value: leave the row alone
        return True

    def pick(self, table: str, exclude: Sequence[int] = ()) -> int | None:
        free = [i for i in self.ids(table) if i not in exclude]
        pool = free or self.ids(table)
        return self.rng.choice(pool) if pool else None

    def ensure_parent(self, table: str, col: str, value: Any, depth: int = 0) -> bool:
        """Make sure a row with ``table.col == value`` exists, copying it from the real DB."""
        spec = self.column(table, col)
        if spec is None or depth > 8:
            return False
        name = _q(self.name(table))
        probe = f"SELECT rowid, * FROM {name} WHERE CAST({_q(spec.name)} AS TEXT) = ?"
        if self.conn.execute(probe + " LIMIT 1", (str(value),)).fetchone():
            return True
        found = self.real.execute(probe, (str(value),)).fetchall()
        if not found:
            return False
        columns = [c.name for c in self.info.tables[table].columns]
        marks = ", ".join("?" for _ in range(len(columns) + 1))
        cols = ", ".join(["rowid", *(_q(c) for c in columns)])
        for row in found:
            try:
                self.conn.execute(f"INSERT INTO {name} ({cols}) VALUES ({marks})", row)
            except sqlite3.IntegrityError:
                continue
            self.rowids.pop(table, None)
            # The restored row's own references must resolve too.
            for (child, ccol), (parent, pcol) in self.child_fk.items():
                if child == table and parent in self.info.tables:
                    idx = (
                        [c.lower() for c in columns].index(ccol) + 1
                        if ccol in [c.lower() for c in columns]
                        else None
                    )
                    if idx is not None and row[idx] is not None:
                        self.ensure_parent(parent, pcol, row[idx], depth + 1)
        return True

    def fresh(self, table: str, col: str, k: int) -> Any:
        """A value no row of ``table.col`` has (same type as the column's values)."""
        existing = [v for v in self.values(table, col) if v is not None]
        numbers = [v for v in existing if isinstance(v, int | float)]
        if numbers and len(numbers) == len(existing):
            return (
                max(numbers) + 1 + k
                if all(isinstance(v, int) for v in numbers)
                else (max(numbers) + 0.5 + k)
            )
        base = str(self.rng.choice(existing)) if existing else "w"
        return f"{base} ~{self.variant}{k}"

    def duplicates(self, facts: GoldFacts) -> None:
        """Give selected columns a repeated value, so a missing DISTINCT shows."""
        for t, col in sorted(facts.projected):
            if t not in self.info.tables or not self.modifiable(t, col):
                continue
            if (t, col) in self.info.key_columns or (t, col) in facts.conditions:
                continue
            ids = self.ids(t)
            if len(ids) < 2:
                continue
            src, dst = self.rng.sample(ids, 2)
            value = self.get(t, src, col)
            if value is not None:
                self.set(t, dst, col, value)

    # -- the three kinds of update ------------------------------------------------------------

    def conditions(self, facts: GoldFacts) -> None:
        by_table: dict[str, list[tuple[str, list[Any], list[Any]]]] = {}
        for (t, col), conds in facts.conditions.items():
            if t not in self.info.tables or not self.modifiable(t, col):
                continue
            spec = self.column(t, col)
            assert spec is not None
            text_mode = spec.affinity == "TEXT"
            existing = self.values(t, col)
            sat: list[Any] = []
            near: list[Any] = []
            for op, value in conds:
                sat += satisfying_values(op, value, text_mode=text_mode)
                near += near_miss_values(op, value, text_mode=text_mode)
            sat = list(dict.fromkeys(_coerce(v, existing) for v in sat))
            near = list(dict.fromkeys(_coerce(v, existing) for v in near))
            if (t, col) in self.child_fk:
                # A foreign key may only take values its parent has: bring the parent row back
                # from the real database when subsampling dropped it.
                parent, pcol = self.child_fk[(t, col)]
                if parent not in self.info.tables:
                    continue
                sat = [v for v in sat if self.ensure_parent(parent, pcol, v)]
                allowed = {str(v) for v in self.values(parent, pcol)}
                others = sorted(allowed - {str(v) for v in sat})
                near = [_coerce(v, existing) for v in self.rng.sample(others, min(2, len(others)))]
            if sat:
                by_table.setdefault(t, []).append((col, sat, near))
        for t, cols in by_table.items():
            witness = {c: sat[self.variant % len(sat)] for c, sat, _n in cols}
            like: list[int] = []
            # Two witness rows, their selected columns set to values no other row has, so
            # DISTINCT/INTERSECT cannot hide them and MAX/MIN, SUM/AVG over them differ.
            for k in range(2):
                rid = self.pick(t, exclude=like)
                if rid is None or rid in like:
                    break
                for c, v in witness.items():
                    self.set(t, rid, c, v)
                for pt, pc in sorted(facts.projected):
                    if (
                        pt == t
                        and pc not in witness
                        and self.modifiable(t, pc)
                        and ((t, pc) not in self.info.key_columns)
                    ):
                        self.set(t, rid, pc, self.fresh(t, pc, k))
                like.append(rid)
            if not like:
                continue
            for c, _sat, near in cols:
                for miss in near[:2]:
                    rid = self.pick(t, exclude=like)
                    if rid is None:
                        break
                    for c2, v in witness.items():
                        self.set(t, rid, c2, miss if c2 == c else v)
                    like.append(rid)
            self.witness_like[t] = like

    def links(self, facts: GoldFacts) -> None:
        groups = [
            [(t, c) for t, c in sorted(g) if t in self.info.tables and self.column(t, c)]
            for g in facts.links
        ]
        groups = [g for g in groups if len(g) >= 2]
        for _ in range(2):  # a second pass lets witnesses travel along chains of joins
            for group in groups:
                self._link(group)

    def _link(self, group: list[tuple[str, str]]) -> None:
        def rank(member: tuple[str, str]) -> tuple[int, int]:
            t, c = member
            return (0 if t in self.witness_like else 1, 0 if not self.modifiable(t, c) else 1)

        anchor_t, anchor_c = min(group, key=rank)
        if anchor_t not in self.witness_like:
            rid = self.pick(anchor_t)
            if rid is None:
                return
            self.witness_like[anchor_t] = [rid]
        anchor_values = [self.get(anchor_t, r, anchor_c) for r in self.witness_like[anchor_t]]
        for t, c in group:
            if (t, c) == (anchor_t, anchor_c) or t == anchor_t or not self.modifiable(t, c):
                continue
            targets = list(self.witness_like.get(t, []))
            while len(targets) < len(anchor_values):
                rid = self.pick(t, exclude=targets)
                if rid is None or rid in targets:
                    break
                targets.append(rid)
            for rid, value in zip(targets, anchor_values, strict=False):
                if value is not None:
                    self.set(t, rid, c, value)
            self.witness_like[t] = targets


def _coerce(value: Any, existing: list[Any]) -> Any:
    """Give an injected value the type the column actually holds (numbers as text etc.)."""
    kinds = {type(v) for v in existing if v is not None}
    if isinstance(value, int | float) and kinds == {str}:
        return str(value)
    if isinstance(value, str) and kinds and kinds <= {int, float}:
        try:
            return int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def _inject(
    conn: sqlite3.Connection,
    info: _DbInfo,
    gold_sql: str,
    rng: random.Random,
    variant: int,
    real: sqlite3.Connection,
) -> None:
    facts = analyse_gold(gold_sql, info.tables)
    injector = _Injector(conn, info, rng, variant, real)
    injector.duplicates(facts)
    injector.conditions(facts)
    injector.links(facts)


def suite_variants(
    db_path: str, gold_sql: str, *, n: int = DEFAULT_SUITE_SIZE, seed: int = 0
) -> list[bytes]:
    """``n`` serialized variant databases of ``db_path`` aimed at ``gold_sql`` (see above)."""
    if n <= 0:
        return []
    key = hashlib.sha256(
        json.dumps([_identity(db_path), gold_sql, n, seed, SUITE_VERSION]).encode()
    ).hexdigest()
    if key in _SUITE_CACHE:
        _SUITE_CACHE.move_to_end(key)
        return _SUITE_CACHE[key]
    info, bases = base_variants(db_path, n=n, seed=seed)
    out: list[bytes] = []
    real = _load(db_path)
    try:
        for i, blob in enumerate(bases):
            conn = sqlite3.connect(":memory:", isolation_level=None)
            try:
                conn.deserialize(blob)
                _inject(conn, info, gold_sql, random.Random(_seed("inject", key, i)), i, real)
                out.append(conn.serialize())
            finally:
                conn.close()
    finally:
        real.close()
    _SUITE_CACHE[key] = out
    if len(_SUITE_CACHE) > _SUITE_CACHE_SIZE:
        _SUITE_CACHE.popitem(last=False)
    return out


def suite_identity(db_path: str, n: int, seed: int) -> tuple[Any, ...]:
    """Identity of the variants of one database, for result caches (gold SQL not included)."""
    return (_identity(db_path), n, seed, SUITE_VERSION)
