"""``data.sql_style: dealiased``: gold SQL with table names instead of T1/T2 aliases.

The rewrite must keep every query's meaning (checked here on all of Spider dev against the real
databases), leave alias-free SQL byte-for-byte alone, refuse self-joins and correlated
subqueries, and never move an example across the train/valid/test split.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.sql_style import apply_sql_style, dealias

TABLE_ALIAS = re.compile(r"\b(?:FROM|JOIN)\s+\w+\s+AS\s+T\d", re.IGNORECASE)


def test_join_aliases_become_table_names() -> None:
    sql = (
        "SELECT T2.name ,  T2.capacity FROM concert AS T1 JOIN stadium AS T2 ON "
        "T1.stadium_id  =  T2.stadium_id WHERE T1.year  >=  2014"
    )
    assert dealias(sql) == (
        "SELECT stadium.name, stadium.capacity FROM concert JOIN stadium ON "
        "concert.stadium_id = stadium.stadium_id WHERE concert.year >= 2014"
    )


def test_each_set_operand_has_its_own_aliases() -> None:
    sql = (
        "SELECT T1.a FROM x AS T1 JOIN y AS T2 ON T1.id = T2.id WHERE T2.b = 1 "
        "INTERSECT SELECT T1.a FROM x AS T1 JOIN z AS T2 ON T1.id = T2.id"
    )
    assert dealias(sql) == (
        "SELECT x.a FROM x JOIN y ON x.id = y.id WHERE y.b = 1 "
        "INTERSECT SELECT x.a FROM x JOIN z ON x.id = z.id"
    )


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT count(*) FROM FLIGHTS WHERE SourceAirport  =  "APG"',  # no alias: untouched
        "SELECT T1.name FROM people AS T1 JOIN people AS T2 ON T1.boss = T2.id",  # self-join
        # correlated: the subquery refers to the outer query's alias
        "SELECT T1.name FROM a AS T1 WHERE EXISTS (SELECT 1 FROM b AS T2 WHERE T2.x = T1.x)",
        "SELECT FROM WHERE (",  # unparseable
    ],
)
def test_sql_that_must_keep_its_aliases_is_returned_unchanged(sql: str) -> None:
    assert dealias(sql) == sql


def test_every_spider_rewrite_returns_the_same_rows(spider_dir: Path) -> None:
    from dataset_utils.sources import SourceSpec, load_source

    rows = load_source(SourceSpec(format="spider", path=str(spider_dir)), None).examples
    styled, n = apply_sql_style(rows, "dealiased")
    aliased = [r for r in rows if TABLE_ALIAS.search(r.sql)]
    assert len(rows) == 972 and len(aliased) >= 390
    assert n >= 390  # all but the self-joins
    for old, new in zip(rows, styled, strict=True):
        assert (old.question, old.db_path) == (new.question, new.db_path)
        if old.sql == new.sql:
            continue
        assert not TABLE_ALIAS.search(new.sql), new.sql
        conn = sqlite3.connect(f"file:{old.db_path}?mode=ro", uri=True)
        try:
            assert Counter(conn.execute(old.sql).fetchall()) == Counter(
                conn.execute(new.sql).fetchall()
            ), (old.sql, new.sql)
        finally:
            conn.close()


def test_a_rewrite_that_changes_the_rows_is_refused(tmp_path: Path) -> None:
    from dataset_utils import sql_style

    db = tmp_path / "t.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE x (id, a); INSERT INTO x VALUES (1, 'p'), (2, 'q');")
    conn.close()
    ex = Example(
        question="q", context="", sql="SELECT T1.a FROM x AS T1", source="spider", db_path=str(db)
    )
    assert sql_style.dealias_checked(ex).sql == "SELECT x.a FROM x"
    # A (hypothetically) wrong rewrite is caught by running both on the database.
    orig = sql_style.dealias
    try:
        sql_style.dealias = lambda sql: "SELECT x.id FROM x"  # type: ignore[assignment]
        assert sql_style.dealias_checked(ex) is ex
    finally:
        sql_style.dealias = orig  # type: ignore[assignment]


def test_style_is_applied_after_the_split(spider_dir: Path) -> None:
    from dataset_utils.pipeline import prepare_data
    from dataset_utils.sources import SourceSpec
    from tests import tiny

    kwargs = dict(
        sources=[SourceSpec(format="spider", path=str(spider_dir))],
        tokenizer=tiny.tokenizer(),
        chat_format="chatml",
        number_of_samples=200,
        split={"train": 0.8, "valid": 0.1, "test": 0.1, "seed": 3, "group_by": "sql"},
        use_cache=False,
    )
    plain = prepare_data(**kwargs)
    styled = prepare_data(**kwargs, sql_style="dealiased")
    assert styled.report["sql_rewritten"] > 0 and styled.report["sql_style"] == "dealiased"
    for split in ("train", "valid", "test"):
        assert [e.question for e in plain.examples[split]] == [
            e.question for e in styled.examples[split]
        ]
    assert any(
        a.sql != b.sql
        for a, b in zip(plain.examples["train"], styled.examples["train"], strict=True)
    )


def test_unknown_style_is_a_user_error() -> None:
    from trainer.config import DataArgs

    with pytest.raises(UserError, match="sql_style"):
        DataArgs(sql_style="pretty")
