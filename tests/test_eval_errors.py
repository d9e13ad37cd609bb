"""Every verdict category of the judge, each produced by a real SQLite run in the sandbox.

A small SQLite file written per test; each prediction is judged exactly as in an evaluation
(`evaluation.judge.judge_example`, read-only sandbox, time limit), and the category must come
from the error SQLite itself raised (the message is checked too).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dataset_utils.records import Example
from evaluation.judge import (
    CATEGORIES,
    ERROR_CATEGORIES,
    GoldCache,
    categorize_error,
    judge_example,
    score,
)

GOLD = "SELECT name FROM singer WHERE age > 30"
RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"

# (prediction, category, a fragment of the error SQLite / the sandbox reports, or None).
CASES = [
    ("SELECT name FROM singer WHERE age > 30", "correct", None),
    ("SELECT name FROM singers WHERE age > 30", "no such table", "no such table: singers"),
    ("SELECT nam FROM singer WHERE age > 30", "no such column", "no such column: nam"),
    ("SELECT name FROM FROM singer", "syntax error", 'near "FROM": syntax error'),
    ("SELECT name FROM singer WHERE (age > 30", "syntax error", "incomplete input"),
    ("SELECT name FROM singer WHERE name = 'Joe", "syntax error", "unrecognized token"),
    ("", "syntax error", "empty SQL"),
    (
        "SELECT name FROM singer GROUP BY count(*)",
        "other execution error",
        "aggregate functions are not allowed in the GROUP BY clause",
    ),
    ("CREATE TABLE t (a INT)", "other execution error", "refused: only SELECT/WITH/VALUES"),
    (RECURSIVE, "timeout", "timed out after 0.3s"),
    ("SELECT name FROM singer WHERE age < 30", "wrong result", None),
    ("SELECT name FROM singer WHERE age > 100", "empty result", None),
]


@pytest.fixture
def example(tmp_path: Path) -> Example:
    db = tmp_path / "music.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE singer (name TEXT, age INT);"
        "INSERT INTO singer VALUES ('Joe', 52), ('Tim', 32), ('Rose', 41), ('Ann', 25);"
    )
    conn.commit()
    conn.close()
    return Example(
        question="Singers over 30?",
        context="CREATE TABLE singer (name TEXT, age INT)",
        sql=GOLD,
        source="spider",
        db_id="music",
        db_path=str(db),
    )


@pytest.mark.parametrize(("pred", "category", "message"), CASES, ids=[c[1] for c in CASES])
def test_each_category_from_a_real_sqlite_run(
    example: Example, pred: str, category: str, message: str | None
) -> None:
    # suite_size=0: the real file only (the perturbed copies are the judge's own business).
    j = judge_example(example, pred, timeout_s=0.3, suite_size=0, gold_cache=GoldCache())
    assert j.category == category
    assert (j.exec_correct is True) == (category == "correct")
    assert j.executable == (category in ("correct", "wrong result", "empty result"))
    if message is None:
        assert j.error is None
    else:
        assert j.error is not None and message in j.error
        assert categorize_error(j.error) == category


def test_unjudgeable_when_gold_fails(example: Example) -> None:
    broken = Example(**{**example.to_dict(), "sql": "SELECT name FROM nowhere"})
    j = judge_example(broken, "SELECT name FROM singer", suite_size=0, gold_cache=GoldCache())
    assert j.exec_correct is None and j.category == "unjudgeable"


def test_with_the_default_suite_too(example: Example) -> None:
    """With the perturbed copies of the database, as evaluations run by default."""
    cache = GoldCache()
    for pred, category in (
        ("SELECT name FROM singer WHERE age > 100", "empty result"),
        ("SELECT name FROM singer", "wrong result"),
        ("SELECT name FROM singer WHERE age > 30", "correct"),
    ):
        assert judge_example(example, pred, gold_cache=cache).category == category


def test_score_counts_every_category(example: Example) -> None:
    preds = [c[0] for c in CASES]
    examples = [example] * len(preds)
    result = score(examples, preds, timeout_s=0.3, suite_size=0, gold_cache=GoldCache())
    counts = result.categories()
    assert list(counts) == list(CATEGORIES)
    assert counts == {
        "correct": 1,
        "no such table": 1,
        "no such column": 1,
        "syntax error": 4,
        "other execution error": 2,
        "timeout": 1,
        "wrong result": 1,
        "empty result": 1,
        "unjudgeable": 0,
    }
    flat = result.flat_metrics("test_")
    assert flat["test_error_syntax_error"] == pytest.approx(4 / 12)
    assert {f"test_error_{c.replace(' ', '_')}" for c in ERROR_CATEGORIES} <= set(flat)


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("timed out after 2s", "timeout"),
        ("OperationalError: no such table: T2", "no such table"),
        ("OperationalError: no such column: T2.year", "no such column"),
        ('OperationalError: near "ORDER": syntax error', "syntax error"),
        ("OperationalError: ambiguous column name: id", "other execution error"),
        ("result larger than 67108864 bytes", "other execution error"),
        (None, "other execution error"),
    ],
)
def test_categorize_error_messages(message: str | None, category: str) -> None:
    assert categorize_error(message) == category
