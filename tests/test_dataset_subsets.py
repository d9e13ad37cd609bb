"""Difficulty subsets, sample counts, complexity filters, reproducible splits and no leakage.

Boundaries follow the Determined text-to-SQL recipe: question + schema + SQL word count puts a
row in easy (10-100), medium (101-200) or hard (201-800); anything else is in no bucket. The
leakage tests run on the real Spider dev and sql-create-context rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import datasets
import pytest

from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.sources import SourceSpec, load_source
from dataset_utils.subsets import (
    DIFFICULTY_BUCKETS,
    Splits,
    assert_no_leakage,
    difficulty_of,
    pair_key,
    select_subset,
    split_examples,
    sql_group_key,
    word_count,
)

GRETEL = Path(__file__).parent / "fixtures" / "gretel_sample.parquet"
CONTEXT = "CREATE TABLE t (a)"  # 4 words
SQL = "SELECT a FROM t"  # 4 words


def example_with_words(total: int, tag: str = "") -> Example:
    """An example whose question + schema + SQL has exactly ``total`` words."""
    filler = total - 8 - (1 if tag else 0)
    assert filler >= 0
    question = " ".join([tag] * bool(tag) + ["word"] * filler)
    e = Example(question=question, context=CONTEXT, sql=SQL, source="test")
    assert word_count(e) == total
    return e


def numbered(n: int, words: int = 20) -> list[Example]:
    return [example_with_words(words, tag=f"q{i}") for i in range(n)]


# --------------------------------------------------------------------------------------------
# Difficulty buckets


@pytest.mark.parametrize(
    ("words", "bucket"),
    [
        (9, None),
        (10, "easy"),
        (100, "easy"),
        (101, "medium"),
        (200, "medium"),
        (201, "hard"),
        (800, "hard"),
        (801, None),
    ],
)
def test_bucket_boundaries(words: int, bucket: str | None) -> None:
    e = example_with_words(words, tag="probe")
    assert difficulty_of(e) == bucket
    others = [example_with_words(n, tag=name) for name, (n, _) in DIFFICULTY_BUCKETS.items()]
    for name in DIFFICULTY_BUCKETS:
        kept = select_subset([e, *others], name)
        assert ("probe" in {k.question.split()[0] for k in kept}) == (name == bucket), name
    # "all" keeps rows outside every bucket, with difficulty None.
    (only,) = select_subset([e], "all")
    assert only.difficulty == bucket


def test_word_count_splits_on_any_whitespace() -> None:
    e = Example(
        question="how\tmany\nrows ?",
        context="CREATE  TABLE\n t (a INT)",
        sql="SELECT\n\tcount(*)  FROM t",
        source="x",
    )
    assert word_count(e) == 4 + 5 + 4


def test_select_subset_sets_difficulty() -> None:
    rows = [example_with_words(n) for n in (9, 50, 150, 500, 900)]
    assert [e.difficulty for e in select_subset(rows, "all")] == [
        None,
        "easy",
        "medium",
        "hard",
        None,
    ]


def test_number_of_samples_takes_the_first_n_in_order() -> None:
    rows = [*numbered(5, 20), example_with_words(150, "m0"), *numbered(5, 30)]
    got = select_subset(rows, "easy", number_of_samples=7)
    assert [e.question.split()[0] for e in got] == ["q0", "q1", "q2", "q3", "q4", "q0", "q1"]
    assert [e.question for e in select_subset(rows, "all", number_of_samples=6)] == [
        e.question for e in rows[:6]
    ]
    # More than available: all of them, no error.
    assert len(select_subset(rows, "medium", number_of_samples=100)) == 1
    with pytest.raises(UserError) as ei:
        select_subset(rows, "all", number_of_samples=0)
    assert "number_of_samples must be positive, found 0" in str(ei.value)


def test_unknown_subset() -> None:
    with pytest.raises(UserError) as ei:
        select_subset(numbered(3), "extreme")
    assert str(ei.value) == (
        "unknown difficulty subset 'extreme'; expected one of easy, medium, hard, all"
    )


def test_empty_bucket_is_an_error() -> None:
    with pytest.raises(UserError) as ei:
        select_subset(numbered(4), "medium")
    assert "subset 'medium' is empty after filtering 4 rows" in str(ei.value)


# --------------------------------------------------------------------------------------------
# gretel complexity labels


@pytest.fixture(scope="module")
def gretel() -> list[Example]:
    return load_source(SourceSpec(format="gretel", path=str(GRETEL))).examples


def test_complexity_filter(gretel: list[Example]) -> None:
    got = select_subset(gretel, "all", complexity=["window functions"])
    assert [e.extra["id"] for e in got] == [1005, 1012]
    got = select_subset(gretel, "easy", complexity=["basic SQL", "single join"])
    assert [e.complexity for e in got] == ["basic SQL", "single join", "basic SQL", "single join"]
    got = select_subset(gretel, "all", number_of_samples=1, complexity=["aggregation"])
    assert [e.extra["id"] for e in got] == [1002]


def test_complexity_filter_errors(gretel: list[Example]) -> None:
    with pytest.raises(UserError) as ei:
        select_subset(gretel, "all", complexity=["recursive CTE"])
    msg = str(ei.value)
    assert "unknown complexity label(s) ['recursive CTE']" in msg and "'window functions'" in msg
    with pytest.raises(UserError) as ei:
        select_subset(numbered(3), "all", complexity=["basic SQL"])
    assert "rows carry no complexity labels" in str(ei.value)
    with pytest.raises(UserError) as ei:
        select_subset(gretel, "medium", complexity=["basic SQL"])  # all fixture rows are easy
    assert "subset 'medium' with complexity ['basic SQL'] is empty" in str(ei.value)


# --------------------------------------------------------------------------------------------
# Splits


def test_split_sizes_80_10_10_and_reproducible() -> None:
    rows = numbered(200)
    a = split_examples(rows, seed=123)
    assert (len(a.train), len(a.valid), len(a.test)) == (160, 20, 20)
    b = split_examples(rows, seed=123)
    assert a.as_dict() == b.as_dict()  # same rows, same order
    c = split_examples(rows, seed=7)
    assert [e.question for e in c.test] != [e.question for e in a.test]
    assert sorted(e.question for s in a.as_dict().values() for e in s) == sorted(
        e.question for e in rows
    )
    assert a.stats == {
        "rows_in": 200,
        "duplicates_removed": 0,
        "groups": 200,
        "n_train": 160,
        "n_valid": 20,
        "n_test": 20,
    }


def test_split_matches_the_recipe_train_test_split() -> None:
    # The recipe: Dataset.train_test_split(train_size=0.8, seed) then test_size=0.5 of the rest.
    rows = numbered(50)
    got = split_examples(rows, seed=123)
    first = datasets.Dataset.from_dict({"i": list(range(50))}).train_test_split(
        train_size=0.8, seed=123
    )
    second = first["test"].train_test_split(test_size=0.5, seed=123)
    assert got.train == [rows[i] for i in first["train"]["i"]]
    assert got.valid == [rows[i] for i in second["train"]["i"]]
    assert got.test == [rows[i] for i in second["test"]["i"]]


def test_split_other_fractions() -> None:
    rows = numbered(40)
    s = split_examples(rows, train=0.9, valid=0.0, test=0.1)
    assert (len(s.train), len(s.valid), len(s.test)) == (36, 0, 4)
    s = split_examples(rows, train=1.0, valid=0.0, test=0.0)
    assert (len(s.train), len(s.valid), len(s.test)) == (40, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": 0.8, "valid": 0.1, "test": 0.2}, "split fractions must sum to 1"),
        ({"train": 1.2, "valid": -0.1, "test": -0.1}, "must be between 0 and 1"),
        ({"group_by": "table"}, "unknown group_by 'table'; expected one of none, sql, db"),
    ],
)
def test_split_argument_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError) as ei:
        split_examples(numbered(10), **kwargs)  # type: ignore[arg-type]
    assert message in str(ei.value)


def test_split_needs_three_distinct_examples() -> None:
    with pytest.raises(UserError) as ei:
        split_examples([example_with_words(20)] * 5)
    assert "need at least 3 distinct examples to split, found 1" in str(ei.value)


# --------------------------------------------------------------------------------------------
# Duplicates and leakage


def _independent_leak_check(splits: Splits, group_by: str) -> None:
    """Do not trust assert_no_leakage alone: recompute the keys per split here."""
    parts = splits.as_dict()
    pairs = {name: {pair_key(e) for e in rows} for name, rows in parts.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not pairs[a] & pairs[b], f"(question, schema) pair in {a} and {b}"
        if group_by == "sql":
            ga = {sql_group_key(e) for e in parts[a]}
            gb = {sql_group_key(e) for e in parts[b]}
            assert not ga & gb, f"same (schema, SQL) in {a} and {b}"
    # Within a split too: a duplicate kept twice would count twice in evaluation.
    for name, rows in parts.items():
        assert len(pairs[name]) == len(rows), f"duplicate pair inside {name}"
    assert_no_leakage(splits)


@pytest.fixture(scope="module")
def real_rows(spider_dir: Path, sql_create_context_path: Path) -> list[Example]:
    spider = load_source(SourceSpec(format="spider", path=str(spider_dir), split="dev"))
    scc = load_source(SourceSpec(format="sql-create-context", path=str(sql_create_context_path)))
    return [*spider.examples, *scc.examples]


@pytest.mark.parametrize("group_by", ["none", "sql"])
def test_no_leakage_on_real_data(real_rows: list[Example], group_by: str) -> None:
    assert len(real_rows) == 972 + 340
    splits = split_examples(real_rows, seed=123, group_by=group_by)
    _independent_leak_check(splits, group_by)
    n = sum(len(rows) for rows in splits.as_dict().values())
    assert n == len(real_rows) - splits.duplicates_removed
    assert 0.78 < len(splits.train) / n < 0.82
    assert splits.test and splits.valid


def test_group_by_sql_keeps_spider_paraphrases_together(real_rows: list[Example]) -> None:
    splits = split_examples(real_rows, seed=123, group_by="sql")
    owner = {}
    for name, rows in splits.as_dict().items():
        for e in rows:
            owner.setdefault(sql_group_key(e), set()).add(name)
    assert all(len(names) == 1 for names in owner.values())
    # Spider dev really has paraphrases (two questions, one query), so grouping matters:
    assert splits.stats["groups"] < len(real_rows) - splits.duplicates_removed
    # Without grouping at least one paraphrase pair is split across train/test with seed 123.
    plain = split_examples(real_rows, seed=123)
    owner_plain: dict[tuple[str, str], set[str]] = {}
    for name, rows in plain.as_dict().items():
        for e in rows:
            owner_plain.setdefault(sql_group_key(e), set()).add(name)
    assert any(len(names) > 1 for names in owner_plain.values())


@pytest.mark.parametrize("group_by", ["none", "sql"])
def test_duplicates_are_removed_and_counted(real_rows: list[Example], group_by: str) -> None:
    base = real_rows[::10]  # 132 distinct real rows from both sources
    assert len({pair_key(e) for e in base}) == len(base)
    dupes = [
        base[0],  # exact copy
        base[1],
        replace(base[2], question=base[2].question.upper()),  # case differs
        replace(base[3], question="  " + base[3].question.replace(" ", "   ") + " "),  # spaces
        replace(base[4], context=base[4].context.replace(" ", "\n")),  # schema whitespace
        replace(base[5], sql="SELECT 'a different answer'"),  # same pair, other SQL
        replace(base[6], source="another-source"),
    ]
    rows = [*base[:60], *dupes, *base[60:]]
    splits = split_examples(rows, seed=123, group_by=group_by)
    assert splits.duplicates_removed == len(dupes) == 7
    assert splits.stats["rows_in"] == len(rows)
    assert splits.stats["duplicates_removed"] == 7
    kept = [e for part in splits.as_dict().values() for e in part]
    assert len(kept) == len(base)
    # The first occurrence wins: the gold SQL of base[5] is kept, not the later variant.
    assert any(e is base[5] for e in kept)
    assert not any(e.sql == "SELECT 'a different answer'" for e in kept)
    _independent_leak_check(splits, group_by)


def test_assert_no_leakage_detects_a_planted_leak() -> None:
    rows = numbered(30)
    s = split_examples(rows)
    leaked = replace(s.train[0], question=s.train[0].question.upper() + "  ")
    bad = Splits(train=s.train, valid=s.valid, test=[*s.test, leaked])
    with pytest.raises(AssertionError, match="leak"):
        assert_no_leakage(bad)
