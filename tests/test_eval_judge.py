"""Result comparison, SQL metrics, SQL extraction, synthetic databases and the judge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from benchmarks.perturb import (
    PERTURBATIONS,
    calibrate,
    equivalent_rewrite,
    perturb,
    perturbations,
    schema_of,
)
from dataset_utils.records import Example
from dataset_utils.sources import SourceSpec, load_source
from evaluation.execution import gold_is_ordered, normalize_value, results_match
from evaluation.judge import GoldCache, judge_example, method_for, score
from evaluation.postprocess import extract_sql
from evaluation.sql_metrics import bleu, exact_match, is_valid_sql, normalize_sql
from evaluation.synth_db import (
    analyse_gold,
    has_inserts,
    inserts_setup,
    parse_schema,
    synthetic_databases,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Synthetic databases go to a per-test cache, never to ~/.cache.
    monkeypatch.setenv("TEXT2SQL_CACHE", str(tmp_path / "cache"))


# -- result comparison ----------------------------------------------------------------------


def test_multiset_comparison_ignores_order_but_counts_duplicates() -> None:
    gold = [(1, "a"), (2, "b"), (2, "b")]
    assert results_match([(2, "b"), (1, "a"), (2, "b")], gold, ordered=False)
    assert not results_match([(1, "a"), (2, "b")], gold, ordered=False)  # lost a duplicate
    assert not results_match([(1, "a"), (1, "a"), (2, "b")], gold, ordered=False)
    assert not results_match([(2, "b"), (1, "a"), (2, "b")], gold, ordered=True)
    assert results_match(gold, gold, ordered=True)
    assert results_match([], [], ordered=True)
    assert not results_match([(1,)], [], ordered=False)


def test_value_normalization() -> None:
    assert results_match([(1.0,)], [(1,)], ordered=False)  # int 1 vs float 1.0
    assert results_match([(0.1 + 0.2,)], [(0.3,)], ordered=False)  # float noise
    assert results_match([(True,)], [(1,)], ordered=False)
    assert not results_match([(1.5,)], [(1,)], ordered=False)
    assert not results_match([("1",)], [(1,)], ordered=False)  # text is not a number
    assert not results_match([("Paris",)], [("paris",)], ordered=False)  # case matters
    assert not results_match([(None,)], [(0,)], ordered=False)
    assert normalize_value(2.0) == 2 and isinstance(normalize_value(2.0), int)
    assert normalize_value(float("nan")) == normalize_value(float("nan"))


def test_column_permutations_are_tolerated_but_not_other_differences() -> None:
    gold = [("Alice", 30), ("Bob", 25)]
    assert results_match([(30, "Alice"), (25, "Bob")], gold, ordered=True)
    assert not results_match(
        [(30, "Alice"), (25, "Bob")], gold, ordered=True, allow_column_permutation=False
    )
    # Same column multisets but rows paired differently: no permutation fixes it.
    assert not results_match([(25, "Alice"), (30, "Bob")], gold, ordered=False)
    assert not results_match([("Alice",), ("Bob",)], gold, ordered=False)  # column missing
    assert not results_match([("Alice", 30, 1), ("Bob", 25, 1)], gold, ordered=False)
    # Identical-looking columns: the search must still find the pairing.
    assert results_match([(2, 1, 1), (1, 2, 1)], [(1, 1, 2), (1, 2, 1)], ordered=False)


def test_gold_is_ordered_only_at_top_level() -> None:
    assert gold_is_ordered("SELECT name FROM singer ORDER BY age")
    assert not gold_is_ordered("SELECT name FROM singer")
    assert not gold_is_ordered(
        "SELECT count(*) FROM (SELECT name FROM singer ORDER BY age LIMIT 3)"
    )
    assert not gold_is_ordered(
        "SELECT name FROM singer WHERE age > (SELECT age FROM singer ORDER BY age LIMIT 1)"
    )
    assert gold_is_ordered("SELECT a FROM t UNION SELECT b FROM s ORDER BY 1")


# -- SQL metrics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("select name from singer", "SELECT  name\nFROM singer;"),
        ("SELECT T1.name FROM singer AS T1", "SELECT name FROM singer"),
        (
            "SELECT singer.name, COUNT(*) FROM singer JOIN concert ON singer.id = concert.sid "
            "GROUP BY singer.name",
            "SELECT T1.name ,  count(*) AS cnt FROM singer AS T1 JOIN concert AS T2 "
            "ON T1.id = T2.sid GROUP BY T1.name",
        ),
        ("SELECT a FROM t WHERE b != 1", "SELECT a FROM t WHERE b <> 1"),
    ],
)
def test_exact_match_normalizes_case_whitespace_aliases(pred: str, gold: str) -> None:
    assert exact_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (
            "SELECT name FROM singer WHERE name = 'Joe'",
            "SELECT name FROM singer WHERE name = 'joe'",
        ),
        ("SELECT name FROM singer", "SELECT age FROM singer"),
        # Self-join: aliases carry meaning and stay.
        (
            "SELECT a.x FROM t AS a JOIN t AS b ON a.y = b.x",
            "SELECT b.x FROM t AS a JOIN t AS b ON a.y = b.x",
        ),
        ("SELECT count(*) AS n FROM t ORDER BY n", "SELECT count(*) FROM t ORDER BY 1"),
        ("", "SELECT 1"),
    ],
)
def test_exact_match_rejects_real_differences(pred: str, gold: str) -> None:
    assert not exact_match(pred, gold)


def test_exact_match_double_quoted_strings_with_schema() -> None:
    pred, gold = "SELECT a FROM t WHERE b = 'Linda'", 'SELECT a FROM t WHERE b = "Linda"'
    assert not exact_match(pred, gold)  # without a schema "Linda" may be a column
    assert exact_match(pred, gold, known_columns=["a", "b"])
    assert normalize_sql("SELECT Name FROM Singer") == "SELECT name FROM singer"


def test_is_valid_sql() -> None:
    for sql in ("SELECT a FROM t", "SELECT count(*) FROM (SELECT a FROM t)", "DROP TABLE x"):
        assert is_valid_sql(sql), sql
    for sql in ("", "SELECT", "SELECT a FROM", "hello world", "SELECT 1; SELECT 2"):
        assert not is_valid_sql(sql), sql


def test_bleu() -> None:
    assert bleu(["SELECT a FROM t WHERE b = 1"], ["SELECT a FROM t WHERE b = 1"]) == pytest.approx(
        100.0
    )
    assert 0 < bleu(["SELECT a FROM t WHERE b = 2"], ["SELECT a FROM t WHERE b = 1"]) < 100
    assert bleu([], []) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


# -- extracting SQL from model output -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("```sql\nSELECT name FROM singer;\n```", "SELECT name FROM singer"),
        (
            "```SQL\nSELECT name\nFROM singer\n```\nThis lists all singers.",
            "SELECT name\nFROM singer",
        ),
        ("```sql\nSELECT a FROM t WHERE b > 1", "SELECT a FROM t WHERE b > 1"),  # unclosed fence
        ("SQL: SELECT a FROM t", "SELECT a FROM t"),
        ("Answer: SELECT a FROM t; SELECT b FROM t", "SELECT a FROM t"),
        ("**SQL:** SELECT 1", "SELECT 1"),
        (
            "Here is the query: SELECT a FROM t WHERE b = 'x;y';\nIt filters rows.",
            "SELECT a FROM t WHERE b = 'x;y'",
        ),
        (
            "To answer this we need the head table.\nSELECT count(*) FROM head",
            "SELECT count(*) FROM head",
        ),
        ("SELECT a FROM t\n\nExplanation: select a.", "SELECT a FROM t"),
        (
            "  select count(*) from head where age > 56  ",
            "select count(*) from head where age > 56",
        ),
        ("WITH x AS (SELECT 1) SELECT * FROM x;", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("The query is:\n```\nSELECT a FROM t\n```\nDone", "SELECT a FROM t"),
        ("I cannot answer that.", "I cannot answer that."),
        ("", ""),
    ],
)
def test_extract_sql(raw: str, expected: str) -> None:
    assert extract_sql(raw) == expected


# -- synthetic databases --------------------------------------------------------------------


def _rows(path: Path, n: int | None = None) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows[:n] if n else rows


def _scc_example(row: dict[str, str]) -> Example:
    return Example(
        question=row["question"],
        context=row["context"],
        sql=row["answer"],
        source="sql-create-context",
    )


def test_parse_schema_tolerates_dataset_quirks() -> None:
    context = (
        'CREATE TABLE "head" (name VARCHAR, "group" VARCHAR); CREATE TABLE head (age INTEGER);\n'
        "CREATE TABLE t2 (x VARCHAR(12), PRIMARY KEY (x))\nCREATE TABLE t3 (y REAL)"
    )
    tables = parse_schema(context)
    assert [c.name for c in tables["head"].columns] == ["name", "group", "age"]  # merged
    assert [c.affinity for c in tables["head"].columns] == ["TEXT", "TEXT", "INTEGER"]
    assert set(tables) == {"head", "t2", "t3"}  # newline-separated statements split too


def test_gold_analysis_finds_literals_links_and_double_quoted_strings() -> None:
    tables = parse_schema(
        "CREATE TABLE Student (advisor VARCHAR, fname VARCHAR, lname VARCHAR); "
        "CREATE TABLE Faculty (fname VARCHAR, lname VARCHAR, FacID VARCHAR)"
    )
    facts = analyse_gold(
        "SELECT T1.fname FROM Faculty AS T1 JOIN Student AS T2 ON T1.FacID = T2.advisor "
        'WHERE T2.fname = "Linda" AND T2.lname > 3',
        tables,
    )
    assert facts.conditions[("student", "fname")] == [("eq", "Linda")]
    assert facts.conditions[("student", "lname")] == [("gt", 3)]
    assert ("faculty", "fname") not in facts.conditions  # T2 resolves to Student only
    assert facts.group_of(("faculty", "facid")) == {("faculty", "facid"), ("student", "advisor")}


def test_synthetic_dbs_gold_correct_and_changed_literal_caught(
    sql_create_context_path: Path,
) -> None:
    rows = _rows(sql_create_context_path)
    rows = [r for r in rows if perturb(r["answer"], "changed_literal", schema_of(_scc_example(r)))]
    picked = [r for r in rows if "JOIN" not in r["answer"]][:4]
    picked += [r for r in rows if " JOIN " in r["answer"]][:2]
    picked += [r for r in rows if "table_name_" in r["answer"]][:2]  # WikiSQL, all VARCHAR
    assert len(picked) == 8
    cache = GoldCache()
    for row in picked:
        ex = _scc_example(row)
        assert method_for(ex) == "synthetic_db"
        j = judge_example(ex, ex.sql, gold_cache=cache)
        assert j.exec_correct is True and j.method == "synthetic_db", (ex.sql, j)
        wrong = perturb(ex.sql, "changed_literal", schema_of(ex))
        assert wrong is not None
        jw = judge_example(ex, wrong, gold_cache=cache)
        assert jw.exec_correct is False and jw.executable, (wrong, jw)


def test_synthetic_dbs_are_deterministic_and_cached(
    sql_create_context_path: Path, tmp_path: Path
) -> None:
    row = _rows(sql_create_context_path, 1)[0]
    first = synthetic_databases(row["context"], row["answer"], n=3, seed=7)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in first]
    mtimes = [p.stat().st_mtime_ns for p in first]
    again = synthetic_databases(row["context"], row["answer"], n=3, seed=7)
    assert again == first and [p.stat().st_mtime_ns for p in again] == mtimes  # cache hit
    assert all(str(p).startswith(str(tmp_path / "cache" / "synth_db")) for p in first)
    # Files gone (an incomplete cache entry): rebuilt, byte for byte identical -- deterministic.
    for p in first:
        p.unlink()
    rebuilt = synthetic_databases(row["context"], row["answer"], n=3, seed=7)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in rebuilt] == digests
    other = synthetic_databases(row["context"], row["answer"], n=3, seed=8)
    assert other[0].parent != first[0].parent


def test_unjudgeable_when_gold_fails_on_schema(sql_create_context_path: Path) -> None:
    row = next(r for r in _rows(sql_create_context_path) if "SHARE(18 - 49)" in r["answer"])
    ex = _scc_example(row)
    j = judge_example(ex, ex.sql, gold_cache=GoldCache())
    assert j.exec_correct is None and j.unjudgeable_reason
    result = score(
        [ex, _scc_example(_rows(sql_create_context_path, 1)[0])],
        [ex.sql, "SELECT 1"],
        gold_cache=GoldCache(),
    )
    assert result.overall.n == 2 and result.overall.n_judgeable == 1
    assert result.overall.exec_accuracy == 0.0


def test_inserts_context_runs_as_is() -> None:
    context = (
        "CREATE TABLE sales (id INT PRIMARY KEY, region VARCHAR(20), amount DECIMAL(10,2)); "
        "INSERT INTO sales VALUES (1, 'North', 100.5), (2, 'South', 50), (3, 'North', 20);"
    )
    assert has_inserts(context) and not has_inserts("CREATE TABLE t (a INT)")
    assert len(inserts_setup(context)) == 2
    ex = Example(
        question="Total North sales?",
        context=context,
        sql="SELECT SUM(amount) FROM sales WHERE region = 'North'",
        source="gretel",
        complexity="aggregation",
    )
    assert method_for(ex) == "inserts"
    cache = GoldCache()
    assert (
        judge_example(
            ex, "SELECT sum(amount) FROM sales WHERE region='North'", gold_cache=cache
        ).exec_correct
        is True
    )
    wrong = judge_example(ex, "SELECT SUM(amount) FROM sales", gold_cache=cache)
    assert wrong.exec_correct is False and wrong.method == "inserts"
    hostile = judge_example(ex, "DELETE FROM sales", gold_cache=cache)
    assert hostile.exec_correct is False and not hostile.executable
    result = score([ex, ex], ["SELECT 120.5", "SELECT 0"], gold_cache=cache)
    assert result.by_complexity["aggregation"].n_correct == 1


# -- judge and score on Spider --------------------------------------------------------------


@pytest.fixture(scope="module")
def spider100(spider_dir: Path) -> list[Example]:
    from dataset_utils.subsets import with_difficulty

    spec = SourceSpec(format="spider", path=str(spider_dir), split="dev", limit=100)
    return with_difficulty(load_source(spec).examples)


def test_score_aggregates_and_reuses_gold_results(spider100: list[Example]) -> None:
    examples = spider100[:20]
    preds = [e.sql for e in examples[:15]] + ["SELECT 1"] * 4 + ["```sql\nnot sql\n```"]
    cache = GoldCache()
    result = score(examples, preds, gold_cache=cache)
    assert result.overall.n == 20 and result.overall.n_judgeable == 20
    assert result.overall.n_correct == 15
    assert result.overall.exec_accuracy == pytest.approx(0.75)
    assert result.overall.valid_sql_rate == pytest.approx(19 / 20)
    assert result.overall.executable_rate == pytest.approx(19 / 20)
    assert result.overall.exact_match == pytest.approx(15 / 20)
    assert sum(m.n for m in result.by_difficulty.values()) == 20
    assert result.by_complexity == {}
    assert all(j.method == "real_db" for j in result.judgements)
    flat = result.flat_metrics("eval_")
    assert flat["eval_execution_accuracy"] == pytest.approx(0.75)
    misses, hits = cache.misses, cache.hits
    score(examples, [e.sql for e in examples], gold_cache=cache)  # "the adapter"
    assert cache.misses == misses and cache.hits == hits + 20  # gold never ran again
    with pytest.raises(ValueError):
        score(examples, preds[:-1])


def test_perturbations_apply_and_differ(spider100: list[Example]) -> None:
    ex = next(e for e in spider100 if "WHERE" in e.sql and "max(" in e.sql.lower())
    out = perturbations(ex.sql, schema_of(ex))
    assert set(out) == set(PERTURBATIONS)
    assert all(sql is None or sql != ex.sql for sql in out.values())
    assert out["dropped_where"] is not None and "WHERE" not in out["dropped_where"]
    assert perturb("SELECT count(*) FROM singer", "swapped_aggregate", {}) is None
    assert equivalent_rewrite("SELECT a, b FROM t WHERE a > 1", {"t": ["a", "b"]}) == (
        "SELECT b, a FROM t WHERE 1 < a"
    )


def test_judge_calibration_smoke_on_spider(spider100: list[Example]) -> None:
    """Gold vs gold is 100% correct; >= 95% of perturbed gold is judged wrong (100 rows)."""
    rep = calibrate(spider100)
    assert rep.gold.judgeable == 100 and rep.gold.accepted == 100
    assert rep.roundtrip.accepted == rep.roundtrip.judgeable > 0
    assert rep.equivalent.accepted == rep.equivalent.judgeable > 0  # no false negatives
    overall = rep.overall
    assert overall.judgeable > 150
    assert overall.wrong_rate >= 0.95, rep.to_dict()["perturbations"]
