"""Every seed corpus loads into normalized `Example` rows, and every bad input is one clear line.

Real data: Spider dev (972 questions over 19 SQLite databases) and 340 rows of
sql-create-context from ``../shared/data``. Clinton and gretel are not available offline, so
their loaders are tested on the hand-written fixtures in ``tests/fixtures`` (same column
layouts as the originals, see its README). Errors are asserted on their message: it must be
one line that names what was expected and what was found.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.schema import SCHEMA_STYLES
from dataset_utils.sources import FORMATS, SourceSpec, load_source, read_table
from dataset_utils.subsets import select_subset

FIXTURES = Path(__file__).parent / "fixtures"
CLINTON = FIXTURES / "clinton_sample.jsonl"
GRETEL = FIXTURES / "gretel_sample.parquet"
CUSTOM = FIXTURES / "custom_sample.csv"
CUSTOM_COLUMNS = {"question": "nl_question", "context": "schema_ddl", "sql": "gold_sql"}

# From ../shared/data/README.md ("Examples per database").
SPIDER_PER_DB = {
    "battle_death": 16,
    "car_1": 92,
    "concert_singer": 45,
    "course_teach": 30,
    "cre_Doc_Template_Mgt": 84,
    "dog_kennels": 82,
    "employee_hire_evaluation": 38,
    "flight_2": 80,
    "museum_visit": 18,
    "network_1": 56,
    "orchestra": 40,
    "pets_1": 42,
    "poker_player": 40,
    "real_estate_properties": 4,
    "singer": 30,
    "student_transcripts_tracking": 78,
    "tvshow": 62,
    "voter_1": 15,
    "world_1": 120,
}


def user_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    """The message, checked to be the single line a CLI prints."""
    message = str(excinfo.value)
    assert message and "\n" not in message, f"UserError message is not one line: {message!r}"
    return message


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SCC_ROWS = [
    {
        "answer": "SELECT COUNT(*) FROM head WHERE age > 56",
        "question": "How many heads?",
        "context": "CREATE TABLE head (age INTEGER)",
    },
    {
        "answer": "SELECT name FROM singer",
        "question": "Names of singers, with commas, ok?",
        "context": "CREATE TABLE singer (name VARCHAR)",
    },
    {
        "answer": 'SELECT "x" FROM t',
        "question": "Café ² question",
        "context": "CREATE TABLE t (x INT)",
    },
]


# --------------------------------------------------------------------------------------------
# Real Spider dev


@pytest.fixture(scope="module")
def spider_examples(spider_dir: Path) -> list[Example]:
    return load_source(SourceSpec(format="spider", path=str(spider_dir), split="dev")).examples


def test_spider_dev_has_972_rows_over_19_databases(spider_examples: list[Example]) -> None:
    assert len(spider_examples) == 972
    assert len({e.db_path for e in spider_examples}) == 19
    assert Counter(e.db_id for e in spider_examples) == SPIDER_PER_DB
    for e in spider_examples:
        assert e.source == "spider"
        assert e.question and e.sql
        assert e.db_path is not None and Path(e.db_path).is_file()
        assert Path(e.db_path).name == f"{e.db_id}.sqlite"
        assert e.context.startswith("CREATE TABLE ")


def test_spider_gold_sql_runs_on_its_database(spider_examples: list[Example]) -> None:
    # The README says 972/972 gold queries run; db_path must point at the right file for that.
    for e in spider_examples:
        conn = sqlite3.connect(f"file:{e.db_path}?mode=ro", uri=True)
        try:
            conn.execute(e.sql).fetchall()
        finally:
            conn.close()


@pytest.mark.parametrize("style", SCHEMA_STYLES)
def test_spider_schema_styles_are_valid_ddl_for_every_table(spider_dir: Path, style: str) -> None:
    examples = load_source(
        SourceSpec(format="spider", path=str(spider_dir), split="dev", schema_style=style)
    ).examples
    by_db = {e.db_path: e.context for e in examples}
    assert len(by_db) == 19
    for db_path, schema in by_db.items():
        lines = schema.splitlines()
        assert all(line.startswith("CREATE TABLE ") for line in lines)
        if style != "ddl":
            assert "PRIMARY KEY" not in schema
        if style == "columns":
            assert "FOREIGN KEY" not in schema
        # Every line builds a table, and together they build exactly the file's tables.
        built = sqlite3.connect(":memory:")
        for line in lines:
            built.execute(line)
        src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        want = {
            r[0]
            for r in src.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        got = {r[0] for r in built.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        src.close()
        built.close()
        assert got == want


def test_spider_schema_styles_shrink_and_keep_keys(spider_dir: Path) -> None:
    texts = {
        style: load_source(
            SourceSpec(format="spider", path=str(spider_dir), split="dev", schema_style=style)
        ).examples
        for style in SCHEMA_STYLES
    }
    total = {s: sum(len(e.context) for e in ex) for s, ex in texts.items()}
    assert total["ddl"] > total["compact"] > total["columns"]
    joined = {s: "\n".join({e.context for e in ex}) for s, ex in texts.items()}
    assert "PRIMARY KEY" in joined["ddl"]
    # Joins need foreign keys: both ddl and compact keep them.
    assert "FOREIGN KEY" in joined["ddl"] and "FOREIGN KEY" in joined["compact"]


def test_spider_from_local_data_dir_default(spider_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # The full release layout (spider/) when present ...
    monkeypatch.setenv("TEXT2SQL_DATA", str(spider_dir.parent))
    loaded = load_source(SourceSpec(format="spider", split="dev"))
    assert len(loaded.examples) == 972
    assert loaded.origin == str((spider_dir.parent / "spider" / "dev.jsonl").resolve())
    # ... else the dev-only copy, for dev; never for train (that would train on dev).
    (tmp_path / "spider_dev").symlink_to(spider_dir)
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path))
    loaded = load_source(SourceSpec(format="spider", split="dev"))
    assert loaded.origin == str((spider_dir / "dev.jsonl").resolve())
    assert len(loaded.examples) == 972
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="spider", split="train"))
    assert "has no rows file for split 'train'" in user_error(ei)
    # No split named: a folder holding one rows file reads it (as before).
    assert len(load_source(SourceSpec(format="spider")).examples) == 972


def test_spider_needs_its_databases(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "dev.jsonl", [{"db_id": "x", "question": "q?", "query": "S"}])
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="spider", path=str(rows)))
    assert "need their SQLite databases" in user_error(ei)
    (tmp_path / "database").mkdir()
    with pytest.raises(UserError) as ei:
        load_source(
            SourceSpec(format="spider", path=str(rows), database_dir=str(tmp_path / "database"))
        )
    msg = user_error(ei)
    assert "database 'x' not found" in msg and "x.sqlite" in msg


# --------------------------------------------------------------------------------------------
# Real sql-create-context


def test_sql_create_context_has_340_rows(sql_create_context_path: Path) -> None:
    examples = load_source(
        SourceSpec(format="sql-create-context", path=str(sql_create_context_path))
    ).examples
    assert len(examples) == 340
    raw = read_table(sql_create_context_path)
    for e, row in zip(examples, raw, strict=True):
        assert e.source == "sql-create-context"
        assert (e.question, e.context, e.sql) == (
            row["question"].strip(),
            row["context"].strip(),
            row["answer"].strip(),
        )
        assert e.context.startswith("CREATE TABLE")
        assert e.db_path is None and e.complexity is None


def test_sql_create_context_default_local_copy(sql_create_context_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXT2SQL_DATA", str(sql_create_context_path.parents[1]))
    loaded = load_source(SourceSpec(format="sql-create-context"))
    assert len(loaded.examples) == 340
    assert loaded.origin == str(sql_create_context_path.resolve())


# --------------------------------------------------------------------------------------------
# Clinton / gretel / custom fixtures (original layouts, hand-written rows)


def test_clinton_fixture_normalizes() -> None:
    raw = read_table(CLINTON)
    assert set(raw[0]) == {"instruction", "input", "response", "source", "text"}
    examples = load_source(SourceSpec(format="clinton", path=str(CLINTON))).examples
    assert len(examples) == len(raw) == 12
    for e, row in zip(examples, raw, strict=True):
        assert e.source == "clinton"
        assert e.question == row["instruction"] and e.question.strip()
        assert e.instruction == e.question
        assert e.context == row["input"] and e.context.startswith("CREATE TABLE")
        assert e.sql == row["response"] and e.sql.strip()
        assert e.extra == {"source": row["source"]}
        # The pre-rendered `text` prompt must not leak into any field the model sees.
        assert "### Instruction" not in e.question + e.context + e.sql
        assert e.complexity is None and e.db_path is None


def test_gretel_fixture_normalizes_with_complexity() -> None:
    raw = pq.read_table(GRETEL).to_pylist()
    assert list(raw[0]) == [
        "id",
        "domain",
        "domain_description",
        "sql_complexity",
        "sql_complexity_description",
        "sql_task_type",
        "sql_task_type_description",
        "sql_prompt",
        "sql_context",
        "sql",
        "sql_explanation",
    ]
    examples = load_source(SourceSpec(format="gretel", path=str(GRETEL))).examples
    assert len(examples) == 12
    assert {e.complexity for e in examples} >= {
        "basic SQL",
        "aggregation",
        "single join",
        "subqueries",
        "window functions",
    }
    for e, row in zip(examples, raw, strict=True):
        assert e.source == "gretel"
        assert e.question == row["sql_prompt"] and e.question
        assert e.sql == row["sql"] and e.sql
        assert e.complexity == row["sql_complexity"]
        assert "CREATE TABLE" in e.context and "INSERT INTO" in e.context
        assert e.extra["domain"] == row["domain"]
        assert e.extra["sql_task_type"] == row["sql_task_type"]
        assert e.extra["id"] == row["id"]
        # The fixture is self-consistent: the gold query runs on the context's tables + rows.
        conn = sqlite3.connect(":memory:")
        conn.executescript(e.context)
        conn.execute(e.sql)
        conn.close()


def test_custom_csv_with_column_mapping() -> None:
    examples = load_source(
        SourceSpec(format="custom", path=str(CUSTOM), columns=CUSTOM_COLUMNS)
    ).examples
    with CUSTOM.open(encoding="utf-8", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert len(examples) == len(raw) == 6
    for e, row in zip(examples, raw, strict=True):
        assert e.source == "custom_sample"  # custom sources are named after their file
        assert (e.question, e.context, e.sql) == (
            row["nl_question"],
            row["schema_ddl"],
            row["gold_sql"],
        )
    assert examples[2].context.count("CREATE TABLE") == 2  # quoted multi-line cell survives
    assert examples[4].question == 'Show the "premium" customers.'
    assert examples[5].question == "Find the café with the most reviews."


def test_custom_without_context_column_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "qs.csv"
    path.write_text("q,s\nHow many?,SELECT 1\n", encoding="utf-8")
    (e,) = load_source(
        SourceSpec(format="custom", path=str(path), columns={"question": "q", "sql": "s"})
    ).examples
    assert (e.question, e.context, e.sql) == ("How many?", "", "SELECT 1")


def test_custom_mapping_errors() -> None:
    with pytest.raises(UserError) as ei:
        SourceSpec(format="custom", path=str(CUSTOM))
    msg = user_error(ei)
    assert "needs columns mapping at least 'question' and 'sql'" in msg and "found none" in msg
    with pytest.raises(UserError) as ei:
        load_source(
            SourceSpec(
                format="custom", path=str(CUSTOM), columns={**CUSTOM_COLUMNS, "sql": "query"}
            )
        )
    msg = user_error(ei)
    assert "missing column(s) 'query'" in msg
    assert "found columns: gold_sql, nl_question, notes, schema_ddl" in msg


# --------------------------------------------------------------------------------------------
# Local JSON / JSONL / CSV / Parquet files, and folders


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "jsonl": write_jsonl(tmp_path / "rows.jsonl", SCC_ROWS),
        "json": tmp_path / "rows.json",
        "json-wrapped": tmp_path / "wrapped.json",
        "csv": tmp_path / "rows.csv",
        "csv-bom": tmp_path / "bom.csv",
        "parquet": tmp_path / "rows.parquet",
    }
    paths["json"].write_text(json.dumps(SCC_ROWS), encoding="utf-8")
    paths["json-wrapped"].write_text(json.dumps({"data": SCC_ROWS}), encoding="utf-8")
    for key, enc in (("csv", "utf-8"), ("csv-bom", "utf-8-sig")):
        with paths[key].open("w", encoding=enc, newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["question", "context", "answer"])
            w.writeheader()
            w.writerows(SCC_ROWS)
    pq.write_table(pa.Table.from_pylist(SCC_ROWS), paths["parquet"])
    return paths


def test_every_local_file_type_gives_the_same_examples(tmp_path: Path) -> None:
    paths = _write_all_formats(tmp_path)
    expected = [
        Example(r["question"], r["context"], r["answer"], "sql-create-context") for r in SCC_ROWS
    ]
    for kind, path in paths.items():
        got = load_source(SourceSpec(format="sql-create-context", path=str(path))).examples
        assert got == expected, kind


def test_limit_reads_the_first_rows(tmp_path: Path) -> None:
    for kind, path in _write_all_formats(tmp_path).items():
        got = load_source(SourceSpec(format="sql-create-context", path=str(path), limit=2))
        assert [e.question for e in got.examples] == [r["question"] for r in SCC_ROWS[:2]], kind


def test_folder_with_one_file_and_relative_path(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", SCC_ROWS)
    assert len(load_source(SourceSpec(format="sql-create-context", path=str(folder))).examples) == 3
    # Relative paths resolve against the local data directory.
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path))
    assert len(load_source(SourceSpec(format="sql-create-context", path="mydata")).examples) == 3
    write_jsonl(folder / "more.jsonl", SCC_ROWS)
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(folder)))
    assert "must hold exactly one data file" in user_error(ei) and "found 2" in str(ei.value)


def test_fingerprint_follows_file_contents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", SCC_ROWS)
    spec = SourceSpec(format="sql-create-context", path=str(path))
    first = load_source(spec).fingerprint
    assert load_source(spec).fingerprint == first
    write_jsonl(path, [*SCC_ROWS[:2], {**SCC_ROWS[2], "answer": "SELECT 2"}])
    assert load_source(spec).fingerprint != first


# --------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_missing_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "answer": "SELECT 1"}])
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    msg = user_error(ei)
    assert "missing column(s) 'context' for format 'sql-create-context'" in msg
    assert "found columns: answer, question" in msg


def test_gretel_layout_given_as_clinton(tmp_path: Path) -> None:
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="clinton", path=str(GRETEL)))
    msg = user_error(ei)
    assert "missing column(s) 'instruction', 'input', 'response' for format 'clinton'" in msg
    assert "sql_prompt" in msg


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", b"", "is empty (0 bytes)"),
        ("blank.jsonl", b"\n\n  \n", "has no rows"),
        ("empty.json", b"[]", "has no rows"),
        ("header.csv", b"question,context,answer\n", "has no rows"),
    ],
)
def test_empty_file(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    msg = user_error(ei)
    assert expected in msg and str(path) in msg


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table(
            {
                "question": pa.array([], pa.string()),
                "context": pa.array([], pa.string()),
                "answer": pa.array([], pa.string()),
            }
        ),
        path,
    )
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert "has no rows" in user_error(ei)


def test_empty_subset_after_filtering(sql_create_context_path: Path) -> None:
    examples = load_source(
        SourceSpec(format="sql-create-context", path=str(sql_create_context_path))
    ).examples
    with pytest.raises(UserError) as ei:
        select_subset(examples, "hard")  # every real sql-create-context row has <= 100 words
    msg = user_error(ei)
    assert "subset 'hard' is empty after filtering 340 rows" in msg
    assert "'hard': (201, 800)" in msg


def test_non_string_sql(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            SCC_ROWS[0],
            {"question": "q?", "context": "CREATE TABLE t (a INT)", "answer": 42},
        ],
    )
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    msg = user_error(ei)
    assert "row 2: column 'answer' must be a string, found int (42)" in msg


def test_non_string_sql_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(
        pa.table({"question": ["q?"], "context": ["CREATE TABLE t (a INT)"], "answer": [3.5]}), path
    )
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert "column 'answer' must be a string, found float" in user_error(ei)


@pytest.mark.parametrize(("value", "expected"), [(None, "is null"), ("   ", "is empty")])
def test_null_or_blank_question(tmp_path: Path, value: object, expected: str) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{**SCC_ROWS[0], "question": value}])
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert f"row 1: column 'question' {expected}" in user_error(ei)


def test_null_question_in_gretel_parquet(tmp_path: Path) -> None:
    rows = pq.read_table(GRETEL).to_pylist()
    rows[3]["sql_prompt"] = None
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="gretel", path=str(path)))
    assert "row 4: column 'sql_prompt' is null" in user_error(ei)


def test_unknown_format_name() -> None:
    with pytest.raises(UserError) as ei:
        SourceSpec(format="wikisql")
    msg = user_error(ei)
    assert "unknown dataset format 'wikisql'" in msg
    assert "expected one of " + ", ".join(sorted(FORMATS)) in msg


def test_unknown_schema_style() -> None:
    with pytest.raises(UserError) as ei:
        SourceSpec(format="spider", schema_style="pretty")
    assert "unknown schema_style 'pretty'; expected one of ddl, compact, columns" in user_error(ei)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_wrong_encoding(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        text = "question,context,answer\nCafé?,CREATE TABLE t (a INT),SELECT a FROM t\n"
    elif suffix == ".jsonl":
        text = json.dumps({**SCC_ROWS[0], "question": "Café?"}, ensure_ascii=False) + "\n"
    else:
        text = json.dumps([{**SCC_ROWS[0], "question": "Café?"}], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    msg = user_error(ei)
    assert f"dataset file {path} is not valid UTF-8" in msg
    assert "re-encode it as UTF-8" in msg


def test_invalid_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(SCC_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert f"{path}:2: invalid JSON" in user_error(ei)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert "expected a JSON object per line, found list" in user_error(ei)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(path)))
    assert "unsupported file type .tsv" in user_error(ei)


def test_dataset_path_does_not_exist(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path="nope/rows.jsonl"))
    msg = user_error(ei)
    assert "dataset path 'nope/rows.jsonl' does not exist" in msg
    assert str(tmp_path / "nope" / "rows.jsonl") in msg  # says where it looked
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="sql-create-context", path=str(tmp_path / "abs.jsonl")))
    assert "does not exist" in user_error(ei)


@pytest.mark.parametrize(
    ("spec", "hub_id"),
    [
        (SourceSpec(format="gretel"), "gretelai/synthetic_text_to_sql"),
        (SourceSpec(format="clinton"), "Clinton/Text-to-sql-v1"),
        (
            SourceSpec(format="sql-create-context", hub_id="b-mc2/sql-create-context"),
            "b-mc2/sql-create-context",
        ),
    ],
)
def test_hub_requested_while_offline(
    tmp_path: Path, monkeypatch, spec: SourceSpec, hub_id: str
) -> None:
    # An empty local data directory: nothing local, so the loader would go to the Hub.
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as ei:
        load_source(spec)
    msg = user_error(ei)
    assert f"dataset {hub_id!r} is not available locally" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    # ...and it says how to point at local files.
    assert "set the source's `path`" in msg and "TEXT2SQL_DATA=" in msg


def test_custom_without_path_has_no_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path))
    with pytest.raises(UserError) as ei:
        load_source(SourceSpec(format="custom", columns={"question": "q", "sql": "s"}))
    assert "format 'custom' has no Hub dataset; give data path=<file>" in user_error(ei)


def test_bad_limit() -> None:
    with pytest.raises(UserError) as ei:
        SourceSpec(format="sql-create-context", limit=0)
    assert "limit must be a positive integer, found 0" in user_error(ei)
