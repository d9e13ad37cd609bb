"""Schema prompt options for Spider-style rows: exact rendered text, read-only, deterministic.

A small SQLite file written per test (known rows: duplicates, NULLs, a quote, a blob, text too
long to show, a ``*/`` inside a value, a WITHOUT ROWID table with a quoted name) pins the exact
output of every option; the real Spider files check the options end to end through
`load_source` and that ``tables.json`` and the SQLite declarations give the same keys.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dataset_utils.errors import UserError
from dataset_utils.schema import (
    ForeignKey,
    Table,
    parse_tables,
    read_tables,
    relevant_tables,
    schema_from_sqlite,
)
from dataset_utils.sources import SourceSpec, load_source

DDL = """
CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country VARCHAR(20), age INT,
                     photo BLOB);
CREATE TABLE concert (concert_id INT, concert_name TEXT, year INT, PRIMARY KEY (concert_id));
CREATE TABLE singer_in_concert (concert_id INT REFERENCES concert(concert_id),
                                singer_id INT REFERENCES singer(singer_id),
                                PRIMARY KEY (concert_id, singer_id));
CREATE TABLE "stadium info" (id INT PRIMARY KEY, capacity REAL, note TEXT) WITHOUT ROWID;
INSERT INTO singer VALUES (1, 'Joe Sharp', 'Netherlands', 52, x'00'), (2, 'O''Neil', NULL, 32,
    NULL), (3, 'Joe Sharp', 'France', 52, NULL), (4, NULL, 'France', 41, NULL);
INSERT INTO concert VALUES (10, 'Auditions', 2014),
    (11, 'A very long concert name that goes on and on forever', 2015), (12, 'End */ here', 2014);
INSERT INTO singer_in_concert VALUES (10, 1), (11, 2), (12, 1);
INSERT INTO "stadium info" VALUES (3, 1.5, 'c'), (1, 2.25, 'a'), (2, 0.5, 'b');
"""

PLAIN_DDL = """\
CREATE TABLE singer (singer_id INTEGER, name TEXT, country VARCHAR(20), age INT, photo BLOB, \
PRIMARY KEY (singer_id))
CREATE TABLE concert (concert_id INT, concert_name TEXT, year INT, PRIMARY KEY (concert_id))
CREATE TABLE singer_in_concert (concert_id INT, singer_id INT, PRIMARY KEY (concert_id, \
singer_id), FOREIGN KEY (singer_id) REFERENCES singer(singer_id), FOREIGN KEY (concert_id) \
REFERENCES concert(concert_id))
CREATE TABLE "stadium info" (id INT, capacity REAL, note TEXT, PRIMARY KEY (id))"""

SAMPLED_DDL = """\
CREATE TABLE singer (singer_id INTEGER /* 1, 2 */, name TEXT /* 'Joe Sharp', 'O''Neil' */, \
country VARCHAR(20) /* 'Netherlands', 'France' */, age INT /* 52, 32 */, photo BLOB, \
PRIMARY KEY (singer_id))
CREATE TABLE concert (concert_id INT /* 10, 11 */, concert_name TEXT /* 'Auditions', \
'End * / here' */, year INT /* 2014, 2015 */, PRIMARY KEY (concert_id))
CREATE TABLE singer_in_concert (concert_id INT /* 10, 11 */, singer_id INT /* 1, 2 */, \
PRIMARY KEY (concert_id, singer_id), FOREIGN KEY (singer_id) REFERENCES singer(singer_id), \
FOREIGN KEY (concert_id) REFERENCES concert(concert_id))
CREATE TABLE "stadium info" (id INT /* 1, 2 */, capacity REAL /* 0.5, 1.5 */, \
note TEXT /* 'a', 'b' */, PRIMARY KEY (id))"""

COLUMNS_WITH_KEYS = """\
CREATE TABLE singer (singer_id, name, country, age, photo)
CREATE TABLE concert (concert_id, concert_name, year)
CREATE TABLE singer_in_concert (concert_id, singer_id, FOREIGN KEY (singer_id) REFERENCES \
singer(singer_id), FOREIGN KEY (concert_id) REFERENCES concert(concert_id))
CREATE TABLE "stadium info" (id, capacity, note)"""


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = tmp_path / "music" / "music.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(DDL)
    conn.commit()
    conn.close()
    return str(path)


def test_defaults_are_unchanged(db: str) -> None:
    assert schema_from_sqlite(db) == PLAIN_DDL
    assert schema_from_sqlite(db, "ddl", foreign_keys="sqlite") == PLAIN_DDL
    assert "FOREIGN KEY" not in schema_from_sqlite(db, "columns")


def test_sample_values(db: str) -> None:
    # First distinct non-null values in row order; blobs and text over 40 characters are not
    # shown; quotes doubled; a "*/" in the data cannot close the comment; WITHOUT ROWID tables
    # take the smallest values.
    assert schema_from_sqlite(db, sample_values_per_column=2) == SAMPLED_DDL
    compact = schema_from_sqlite(db, "compact", sample_values_per_column=3).splitlines()
    assert compact[0] == (
        "CREATE TABLE singer (singer_id /* 1, 2, 3 */, name /* 'Joe Sharp', 'O''Neil' */, "
        "country /* 'Netherlands', 'France' */, age /* 52, 32, 41 */, photo)"
    )
    assert compact[3] == (
        'CREATE TABLE "stadium info" (id /* 1, 2, 3 */, capacity /* 0.5, 1.5, 2.25 */, '
        "note /* 'a', 'b', 'c' */)"
    )


def test_rendered_schemas_build_the_same_tables(db: str, tmp_path: Path) -> None:
    for kwargs in ({}, {"sample_values_per_column": 3}, {"foreign_keys": "sqlite"}):
        for style in ("ddl", "compact", "columns"):
            text = schema_from_sqlite(db, style, **kwargs)  # type: ignore[arg-type]
            conn = sqlite3.connect(":memory:")
            conn.executescript(text.replace("\n", ";\n") + ";")
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master ORDER BY rowid")]
            assert [n for n in names if not n.startswith("sqlite_")] == [
                "singer",
                "concert",
                "singer_in_concert",
                "stadium info",
            ]


def test_foreign_keys_from_tables_json_or_none(db: str, tmp_path: Path) -> None:
    # A tables.json that declares one key the file does not (concert -> singer) and not the
    # file's own keys: the rendering follows it.
    tables_json = tmp_path / "tables.json"
    entry = {
        "db_id": "music",
        "table_names_original": ["singer", "concert", "singer_in_concert", "stadium info"],
        "column_names_original": [
            [-1, "*"],
            [0, "singer_id"],
            [0, "name"],
            [1, "concert_id"],
            [1, "year"],
            [2, "concert_id"],
            [2, "singer_id"],
        ],
        "foreign_keys": [[6, 1]],
    }
    tables_json.write_text(json.dumps([entry]))
    text = schema_from_sqlite(
        db, "columns", foreign_keys="tables_json", tables_json=str(tables_json), db_id="music"
    )
    assert text.splitlines()[2] == (
        "CREATE TABLE singer_in_concert (concert_id, singer_id, FOREIGN KEY (singer_id) "
        "REFERENCES singer(singer_id))"
    )
    assert schema_from_sqlite(db, "columns", foreign_keys="sqlite") == COLUMNS_WITH_KEYS
    assert "FOREIGN KEY" not in schema_from_sqlite(db, "ddl", foreign_keys="none")
    with pytest.raises(KeyError, match="'other' is not in"):
        schema_from_sqlite(
            db, "columns", foreign_keys="tables_json", tables_json=str(tables_json), db_id="other"
        )


def test_pruning_by_question(db: str) -> None:
    # singer_in_concert: "singer" and "concert" in its name (2 x 3) and its columns (2);
    # singer: its name (3) + singer_id/name columns (2); concert: its name (3) + columns (2):
    # a tie kept in schema order.
    assert relevant_tables(db, "Name the singers of each concert", 2) == (
        "singer",
        "singer_in_concert",
    )
    assert relevant_tables(db, "What is the capacity of stadium 1?", 1) == ("stadium info",)
    # Column words only (age -> singer, year -> concert): the link table between the two kept
    # tables is kept as well.
    assert relevant_tables(db, "What are the ages of people and the year of each show?", 2) == (
        "singer",
        "concert",
        "singer_in_concert",
    )
    assert relevant_tables(db, "anything", 4) == (
        "singer",
        "concert",
        "singer_in_concert",
        "stadium info",
    )
    # Foreign keys to a pruned table are left out.
    keep = relevant_tables(db, "Name the singers of each concert", 2)
    assert schema_from_sqlite(db, "compact", keep_tables=keep) == (
        "CREATE TABLE singer (singer_id, name, country, age, photo)\n"
        "CREATE TABLE singer_in_concert (concert_id, singer_id, FOREIGN KEY (singer_id) "
        "REFERENCES singer(singer_id))"
    )


def test_parse_tables_reads_every_rendering_back(db: str) -> None:
    """Each style and option, on a schema with a quoted name, a WITHOUT ROWID table, a
    composite key and ``*/`` inside a sample value: the tables, columns, types and keys the
    text shows, exactly."""
    assert parse_tables(schema_from_sqlite(db)) == read_tables(db)
    assert parse_tables(SAMPLED_DDL) == read_tables(db)
    typeless = tuple(
        Table(t.name, tuple((c, "") for c, _ in t.columns), (), t.foreign_keys)
        for t in read_tables(db)
    )
    assert parse_tables(COLUMNS_WITH_KEYS) == typeless
    for style in ("compact", "columns"):
        for n in (0, 2):
            text = schema_from_sqlite(db, style, sample_values_per_column=n, foreign_keys="sqlite")
            assert parse_tables(text) == typeless
    kept = schema_from_sqlite(db, "compact", keep_tables=("singer", "singer_in_concert"))
    assert [(t.name, t.foreign_keys) for t in parse_tables(kept)] == [
        ("singer", ()),
        ("singer_in_concert", (ForeignKey("singer_id", "singer", "singer_id"),)),
    ]


def test_parse_tables_tolerates_user_contexts() -> None:
    """What user / gretel contexts carry: MySQL clauses and inline indexes, quoted names of
    every kind, no semicolons, INSERTs, a table declared twice, statements that declare no
    column list, and a piece that cannot even be tokenized."""
    context = """CREATE TABLE IF NOT EXISTS `shop`.`orders` (
  `id` INT NOT NULL AUTO_INCREMENT COMMENT 'row id',
  status ENUM('new', 'done') DEFAULT 'new',
  [total] DECIMAL(10, 2),
  note,
  KEY idx_status (status),
  PRIMARY KEY (`id`)
) ENGINE=InnoDB
INSERT INTO orders VALUES (1, 'new', 2.5, 'x');
CREATE TABLE items (order_id INTEGER REFERENCES orders(id), "key" INT, 'sku' TEXT,
  FOREIGN KEY (sku) REFERENCES products FOREIGN KEY (KEY) REFERENCES keys(k))
CREATE VIEW v AS SELECT * FROM orders;
CREATE TABLE copy AS SELECT * FROM orders;
CREATE TABLE ORDERS (extra TEXT, id INT);
CREATE TABLE broken (a TEXT DEFAULT 'unterminated
"""
    assert parse_tables(context) == (
        Table(
            "orders",
            (
                ("id", "INT"),
                ("status", "ENUM('new', 'done')"),
                ("total", "DECIMAL(10, 2)"),
                ("note", ""),
                ("extra", "TEXT"),
            ),
            ("id",),
            (),
        ),
        Table(
            "items",
            (("order_id", "INTEGER"), ("key", "INT"), ("sku", "TEXT")),
            (),
            (
                ForeignKey("order_id", "orders", "id"),
                ForeignKey("sku", "products", None),
                ForeignKey("key", "keys", "k"),
            ),
        ),
    )
    assert parse_tables("") == parse_tables("no schema here") == ()


def test_the_file_is_only_read(db: str) -> None:
    before = Path(db).read_bytes()
    schema_from_sqlite(db, "ddl", sample_values_per_column=5)
    relevant_tables(db, "singers", 1)
    assert Path(db).read_bytes() == before
    assert not list(Path(db).parent.glob("*-journal")) and not list(Path(db).parent.glob("*-wal"))


# --------------------------------------------------------------------------------------------
# Real Spider


def test_spider_tables_json_and_sqlite_keys_agree(spider_full_dir: Path) -> None:
    tables_json = str(spider_full_dir / "tables.json")
    dbs = sorted(p.name for p in (spider_full_dir / "database").iterdir())
    texts = {
        db: (
            schema_from_sqlite(str(spider_full_dir / "database" / db / f"{db}.sqlite"), "compact"),
            schema_from_sqlite(
                str(spider_full_dir / "database" / db / f"{db}.sqlite"),
                "compact",
                foreign_keys="tables_json",
                tables_json=tables_json,
                db_id=db,
            ),
        )
        for db in dbs
    }
    # Of the 157 databases, the text differs on two: tables.json lacks one key the SQLite
    # file declares (loan -> customer, store_product -> product).
    differ = sorted(db for db, (a, b) in texts.items() if a != b)
    assert len(dbs) == 157 and differ == ["loan_1", "store_product"]
    for db in differ:
        sqlite_text, json_text = texts[db]
        assert sqlite_text.count("FOREIGN KEY") == json_text.count("FOREIGN KEY") + 1


def test_load_source_applies_the_options(spider_full_dir: Path) -> None:
    spec = {"format": "spider", "path": str(spider_full_dir), "split": "dev", "limit": 6}
    rows = load_source(SourceSpec(**spec, schema_style="compact", sample_values=2)).examples
    assert rows[0].question == "How many singers do we have?"
    assert rows[0].context.splitlines()[1] == (
        "CREATE TABLE singer (Singer_ID /* 1, 2 */, Name /* 'Joe Sharp', 'Timbaland' */, "
        "Country /* 'Netherlands', 'United States' */, Song_Name /* 'You', 'Dangerous' */, "
        "Song_release_year /* '1992', '2008' */, Age /* 52, 32 */, Is_male /* 'F', 'T' */)"
    )
    pruned = load_source(SourceSpec(**spec, schema_style="columns", max_tables=1)).examples
    assert [e.context for e in pruned[:2]] == [
        "CREATE TABLE singer (Singer_ID, Name, Country, Song_Name, Song_release_year, Age, Is_male)"
    ] * 2
    keys = load_source(
        SourceSpec(**spec, schema_style="columns", foreign_keys="tables_json")
    ).examples
    assert "FOREIGN KEY (Stadium_ID) REFERENCES stadium(Stadium_ID)" in keys[0].context
    # Different options, different sources (and so different dataset cache keys).
    assert len({load_source(SourceSpec(**spec, sample_values=n)).fingerprint for n in (0, 1)}) == 2


def test_bad_option_values(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown foreign_keys 'pragma'"):
        SourceSpec(format="spider", foreign_keys="pragma")
    with pytest.raises(UserError, match="sample_values must be >= 0"):
        SourceSpec(format="spider", sample_values=-1)
    with pytest.raises(UserError, match="max_tables must be a positive integer"):
        SourceSpec(format="spider", max_tables=0)
    rows = tmp_path / "dev.jsonl"
    rows.write_text('{"db_id": "x", "question": "q?", "query": "SELECT 1"}\n')
    (tmp_path / "database" / "x").mkdir(parents=True)
    sqlite3.connect(tmp_path / "database" / "x" / "x.sqlite").close()
    with pytest.raises(UserError, match="tables_json needs Spider's tables.json"):
        load_source(SourceSpec(format="spider", path=str(tmp_path), foreign_keys="tables_json"))
    (tmp_path / "tables.json").write_text("[]")
    with pytest.raises(UserError, match=r"row 1: database 'x' is not in"):
        load_source(SourceSpec(format="spider", path=str(tmp_path), foreign_keys="tables_json"))
