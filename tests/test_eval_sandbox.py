"""The SQL sandbox holds against hostile model output (evaluation.sandbox).

Every hostile statement must be refused or stopped within the time limit, leave the database
file byte-for-byte unchanged, create no file beside it, and never abort `score()`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from dataset_utils.records import Example
from evaluation import sandbox
from evaluation.judge import GoldCache, score
from evaluation.sandbox import SandboxDB, run_in_memory, run_readonly

TIMEOUT = 0.5
MARGIN = 0.5  # scheduling slack on a loaded 2-core machine

HOSTILE = {
    "drop": "DROP TABLE city",
    "delete": "DELETE FROM city",
    "update": "UPDATE city SET Population = 0",
    "insert": "INSERT INTO city (ID, Name) VALUES (999999, 'x')",
    "create": "CREATE TABLE pwned (a)",
    "attach": "ATTACH DATABASE '{tmp}/other.db' AS other",
    "vacuum_into": "VACUUM INTO '{tmp}/copy.db'",
    "pragma_wal": "PRAGMA journal_mode=WAL",
    "pragma_user_version": "PRAGMA user_version=5",
    "pragma_read": "PRAGMA table_info(city)",
    "begin": "BEGIN IMMEDIATE",
    "load_extension": "SELECT load_extension('x')",
    "cte_delete": "WITH x AS (SELECT 1) DELETE FROM city",
    "cte_insert": "WITH x AS (SELECT 1) INSERT INTO city (ID) SELECT 999999 FROM x",
    "two_statements": "SELECT 1; DROP TABLE city",
    "huge_blob": "SELECT zeroblob(1000000000)",
    "huge_printf": "SELECT printf('%.*c', 2147483647, 'x')",
    "huge_format": "SELECT length(format('%.*c', 1000000000, 'x'))",
    "quadratic_instr": "SELECT instr(printf('%.*c', 4000000, 'a'), 'b')",
}
RUNAWAY = {
    "infinite_recursive_cte": (
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
    ),
    "cross_join": "SELECT count(*) FROM city a, city b, city c, city d",
    "cross_join_sorted": "SELECT a.Name FROM city a, city b ORDER BY random()",
    # Largest strings the length limit allows, fed to a super-linear built-in in a loop.
    "string_functions": (
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
        "SELECT count(*) FROM r WHERE instr(replace(hex(zeroblob(31000)), '0', 'a') || x, "
        "replace(hex(zeroblob(15000)), '0', 'a') || 'b') > 0"
    ),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def world_db(spider_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of Spider's world_1 (4079 cities): the sandbox, not file modes, protects."""
    dst = tmp_path / "world_1.sqlite"
    shutil.copyfile(spider_dir / "database" / "world_1" / "world_1.sqlite", dst)
    os.chmod(dst, 0o644)
    return dst


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_statement_is_refused_and_db_unchanged(world_db: Path, name: str) -> None:
    before, files = _sha256(world_db), _files(world_db.parent)
    sql = HOSTILE[name].format(tmp=world_db.parent)
    start = time.monotonic()
    res = run_readonly(world_db, sql, timeout_s=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert not res.ok and res.error
    assert _sha256(world_db) == before
    assert _files(world_db.parent) == files  # no other.db, copy.db, -wal or -journal


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_runaway_query_stops_within_time_limit(world_db: Path, name: str) -> None:
    before = _sha256(world_db)
    start = time.monotonic()
    res = run_readonly(world_db, RUNAWAY[name], timeout_s=TIMEOUT)
    elapsed = time.monotonic() - start
    assert res.timed_out and not res.ok
    assert "timed out" in (res.error or "")
    assert elapsed < TIMEOUT + MARGIN
    assert _sha256(world_db) == before


def test_watchdog_alone_stops_runaway_queries(
    world_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the progress handler never aborting, the watchdog's interrupt still stops on time.

    The progress handler alone overshot by ~0.5 s on string_functions (its few hundred VM
    instructions span ~25 instr() calls), which once failed CI; the watchdog checks at every
    loop jump.
    """
    monkeypatch.setattr(SandboxDB, "_progress", lambda self: 0)
    for name in ("string_functions", "infinite_recursive_cte"):
        start = time.monotonic()
        res = run_readonly(world_db, RUNAWAY[name], timeout_s=TIMEOUT)
        elapsed = time.monotonic() - start
        assert res.timed_out, name
        assert elapsed < TIMEOUT + MARGIN, (name, elapsed)
    # The next statement on a fresh deadline is not hit by a stale interrupt.
    res = run_readonly(world_db, "SELECT count(*) FROM city", timeout_s=TIMEOUT)
    assert res.ok and res.rows == [(4079,)]


def test_authorizer_alone_blocks_writes(world_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: with the keyword pre-check disabled, SQLite's authorizer still refuses."""
    monkeypatch.setattr(sandbox, "check_statement", lambda sql: None)
    before = _sha256(world_db)
    for name in ("drop", "delete", "update", "insert", "attach", "pragma_user_version", "begin"):
        sql = HOSTILE[name].format(tmp=world_db.parent)
        res = run_readonly(world_db, sql, timeout_s=TIMEOUT)
        assert not res.ok, name
        assert "authoriz" in (res.error or "") or "readonly" in (res.error or ""), res.error
    assert _sha256(world_db) == before
    assert not (world_db.parent / "other.db").exists()


def test_authorizer_policy() -> None:
    allowed = [sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ]
    for action in allowed:
        assert sandbox._authorizer(action, "t", "c", "main", None) == sqlite3.SQLITE_OK
    assert sandbox._authorizer(sqlite3.SQLITE_FUNCTION, None, "count", None, None) == 0
    denied = [
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_ATTACH,
        sqlite3.SQLITE_DETACH,
        sqlite3.SQLITE_PRAGMA,
        sqlite3.SQLITE_TRANSACTION,
        sqlite3.SQLITE_ALTER_TABLE,
    ]
    for action in denied:
        assert sandbox._authorizer(action, "t", None, None, None) == sqlite3.SQLITE_DENY
    deny_ext = sandbox._authorizer(sqlite3.SQLITE_FUNCTION, None, "LOAD_EXTENSION", None, None)
    assert deny_ext == sqlite3.SQLITE_DENY


def test_reads_work_and_rows_are_capped(world_db: Path) -> None:
    res = run_readonly(world_db, "SELECT count(*) FROM city")
    assert res.ok and res.rows == [(4079,)] and res.columns == ["count(*)"]
    res = run_readonly(world_db, "-- comment\n/* c */ SELECT Name FROM city ORDER BY ID;")
    assert res.ok and res.rows[0] == ("Kabul",)
    capped = run_readonly(world_db, "SELECT ID FROM city", max_rows=100)
    assert capped.ok and capped.truncated and len(capped.rows) == 100
    exact = run_readonly(world_db, "SELECT ID FROM city LIMIT 100", max_rows=100)
    assert exact.ok and not exact.truncated and len(exact.rows) == 100


def test_result_byte_budget(world_db: Path) -> None:
    res = run_readonly(world_db, "SELECT zeroblob(60000) FROM city", max_bytes=5_000_000)
    assert not res.ok and "larger than" in (res.error or "")


def test_missing_database_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_readonly(tmp_path / "nope.sqlite", "SELECT 1")


def test_in_memory_database_is_locked_after_setup() -> None:
    setup = "CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (1), (2);"
    assert run_in_memory(setup, "SELECT sum(a) FROM t").rows == [(3,)]
    with SandboxDB.from_script(setup) as db:
        for sql in (
            "UPDATE t SET a = 5",
            "WITH x AS (SELECT 1) DELETE FROM t",
            "PRAGMA query_only = OFF",
            "SELECT load_extension('x')",
        ):
            assert not db.run(sql).ok, sql
        assert db.run("SELECT a FROM t ORDER BY a").rows == [(1,), (2,)]
        start = time.monotonic()
        assert db.run(RUNAWAY["infinite_recursive_cte"], timeout_s=TIMEOUT).timed_out
        assert time.monotonic() - start < TIMEOUT + MARGIN
    bad = run_in_memory("CREATE TABL t (a)", "SELECT 1")
    assert not bad.ok and (bad.error or "").startswith("setup failed")


def test_serialized_database_is_a_private_locked_copy(world_db: Path) -> None:
    src = sqlite3.connect(world_db)
    blob = src.serialize()
    src.close()
    with SandboxDB.from_bytes(blob) as db:
        assert not db.run("WITH x AS (SELECT 1) DELETE FROM city").ok
        assert db.run("SELECT count(*) FROM city").rows == [(4079,)]


def test_score_survives_hostile_predictions(world_db: Path) -> None:
    gold = "SELECT Name FROM city WHERE CountryCode = 'NLD' AND Population > 500000"
    example = Example(
        question="Large Dutch cities?",
        context="CREATE TABLE city (ID INTEGER, Name TEXT, CountryCode TEXT, Population INT)",
        sql=gold,
        source="spider",
        db_id="world_1",
        db_path=str(world_db),
        difficulty="easy",
    )
    preds = [HOSTILE[k].format(tmp=world_db.parent) for k in sorted(HOSTILE)]
    preds += list(RUNAWAY.values()) + ["", "not sql at all", gold]
    before = _sha256(world_db)
    start = time.monotonic()
    # suite_size=0: the hostile queries run on the real file only (keeps the test fast).
    result = score(
        [example] * len(preds), preds, timeout_s=TIMEOUT, suite_size=0, gold_cache=GoldCache()
    )
    assert time.monotonic() - start < len(RUNAWAY) * (TIMEOUT + MARGIN) + 10
    verdicts = [j.exec_correct for j in result.judgements]
    assert verdicts == [False] * (len(preds) - 1) + [True]
    executable = [p for p, j in zip(preds, result.judgements, strict=True) if j.executable]
    assert executable == [gold]  # every hostile one was refused, failed or timed out
    assert result.overall.n == len(preds) and result.overall.n_judgeable == len(preds)
    assert result.overall.exec_accuracy == pytest.approx(1 / len(preds))
    assert _sha256(world_db) == before
