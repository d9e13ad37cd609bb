"""A Spider release archive in the official layout, and a local HTTP server standing in for its
public URL (the Hub and Google Drive cannot be reached from tests).

`build_archive` writes ``spider_data.zip`` exactly as the publisher lays it out
(``spider_data/{train_spider,train_others,dev}.json``, ``tables.json``, ``*_gold.sql``,
``database/<db_id>/<db_id>.sqlite`` + ``schema.sql``, and the ``__MACOSX/`` resource forks the
real archive carries), from generated SQLite databases and template questions whose gold SQL
all run: three train databases and one dev database that no train row uses.

`ArchiveServer` serves files over HTTP on 127.0.0.1 with byte ranges (``Range: bytes=N-`` ->
206), records every request, and can cut the first response short (the connection drops
mid-body) to exercise resume.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import sqlite3
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# db_id -> (DDL statements, rows per table)
_DBS: dict[str, tuple[list[str], dict[str, list[tuple[Any, ...]]]]] = {
    "concert_hall": (
        [
            "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, "
            "age INTEGER)",
            "CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, concert_name TEXT, "
            "year INTEGER, singer_id INTEGER, FOREIGN KEY (singer_id) REFERENCES "
            "singer(singer_id))",
        ],
        {
            "singer": [
                (i, f"Singer {i}", ["France", "Japan", "Chile"][i % 3], 20 + 3 * i)
                for i in range(1, 13)
            ],
            "concert": [(i, f"Tour {i}", 2010 + i % 6, 1 + i % 12) for i in range(1, 21)],
        },
    ),
    "pet_clinic": (
        [
            "CREATE TABLE owner (owner_id INTEGER PRIMARY KEY, name TEXT, city TEXT)",
            "CREATE TABLE pet (pet_id INTEGER PRIMARY KEY, pet_type TEXT, weight REAL, "
            "owner_id INTEGER, FOREIGN KEY (owner_id) REFERENCES owner(owner_id))",
        ],
        {
            "owner": [(i, f"Owner {i}", ["Lyon", "Osaka", "Lima"][i % 3]) for i in range(1, 11)],
            "pet": [(i, ["cat", "dog", "bird"][i % 3], 1.5 + i, 1 + i % 10) for i in range(1, 25)],
        },
    ),
    "book_shop": (
        [
            "CREATE TABLE book (book_id INTEGER PRIMARY KEY, title TEXT, price REAL, year INTEGER)",
            "CREATE TABLE sale (sale_id INTEGER PRIMARY KEY, book_id INTEGER, quantity "
            "INTEGER, FOREIGN KEY (book_id) REFERENCES book(book_id))",
        ],
        {
            "book": [(i, f"Book {i}", 5.0 + i, 1990 + i) for i in range(1, 16)],
            "sale": [(i, 1 + i % 15, 1 + i % 4) for i in range(1, 31)],
        },
    ),
    # Dev only: never seen in training.
    "museum_visits": (
        [
            "CREATE TABLE museum (museum_id INTEGER PRIMARY KEY, name TEXT, open_year "
            "INTEGER, staff INTEGER)",
            "CREATE TABLE visit (visit_id INTEGER PRIMARY KEY, museum_id INTEGER, tickets "
            "INTEGER, FOREIGN KEY (museum_id) REFERENCES museum(museum_id))",
        ],
        {
            "museum": [(i, f"Museum {i}", 1950 + 5 * i, 10 * i) for i in range(1, 9)],
            "visit": [(i, 1 + i % 8, 2 + i % 5) for i in range(1, 21)],
        },
    ),
}
TRAIN_DBS = ("concert_hall", "pet_clinic", "book_shop")
DEV_DBS = ("museum_visits",)

# (db_id, question template, SQL template, values)
_TEMPLATES: list[tuple[str, str, str, list[Any]]] = [
    (
        "concert_hall",
        "How many singers are older than {v}?",
        "SELECT count(*) FROM singer WHERE age > {v}",
        [25, 30, 35, 40, 45],
    ),
    (
        "concert_hall",
        "List the names of singers from {v}.",
        "SELECT name FROM singer WHERE country = '{v}'",
        ["France", "Japan", "Chile"],
    ),
    (
        "concert_hall",
        "How many concerts were held in {v}?",
        "SELECT count(*) FROM concert WHERE year = {v}",
        [2011, 2012, 2013, 2014],
    ),
    (
        "concert_hall",
        "What are the names of concerts by singers older than {v}?",
        "SELECT T1.concert_name FROM concert AS T1 JOIN singer AS T2 ON T1.singer_id = "
        "T2.singer_id WHERE T2.age > {v}",
        [30, 40],
    ),
    (
        "pet_clinic",
        "How many {v}s are there?",
        "SELECT count(*) FROM pet WHERE pet_type = '{v}'",
        ["cat", "dog", "bird"],
    ),
    (
        "pet_clinic",
        "What is the average weight of {v}s?",
        "SELECT avg(weight) FROM pet WHERE pet_type = '{v}'",
        ["cat", "dog", "bird"],
    ),
    (
        "pet_clinic",
        "List the names of owners living in {v}.",
        "SELECT name FROM owner WHERE city = '{v}'",
        ["Lyon", "Osaka", "Lima"],
    ),
    (
        "pet_clinic",
        "How many pets weigh more than {v}?",
        "SELECT count(*) FROM pet WHERE weight > {v}",
        [5, 10, 15, 20],
    ),
    (
        "book_shop",
        "How many books cost more than {v}?",
        "SELECT count(*) FROM book WHERE price > {v}",
        [8, 10, 12, 15],
    ),
    (
        "book_shop",
        "List the titles of books published after {v}.",
        "SELECT title FROM book WHERE year > {v}",
        [1995, 2000, 2003],
    ),
    (
        "book_shop",
        "What is the total quantity sold of book {v}?",
        "SELECT sum(quantity) FROM sale WHERE book_id = {v}",
        [1, 2, 3, 4],
    ),
    (
        "museum_visits",
        "How many museums opened after {v}?",
        "SELECT count(*) FROM museum WHERE open_year > {v}",
        [1960, 1970, 1980],
    ),
    (
        "museum_visits",
        "What are the names of museums with more than {v} staff?",
        "SELECT name FROM museum WHERE staff > {v}",
        [20, 40, 60],
    ),
    (
        "museum_visits",
        "How many tickets were sold for museum {v}?",
        "SELECT sum(tickets) FROM visit WHERE museum_id = {v}",
        [1, 2, 3],
    ),
]


def make_database(path: Path, db_id: str) -> Path:
    ddl, rows = _DBS[db_id]
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for stmt in ddl:
        conn.execute(stmt)
    for table, values in rows.items():
        marks = ",".join("?" * len(values[0]))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    conn.commit()
    conn.close()
    return path


def rows_for(db_ids: tuple[str, ...]) -> list[dict[str, str]]:
    out = []
    for db_id, q, sql, values in _TEMPLATES:
        if db_id in db_ids:
            out += [
                {"db_id": db_id, "question": q.format(v=v), "query": sql.format(v=v)}
                for v in values
            ]
    return out


def _tables_entry(db_id: str) -> dict[str, Any]:
    ddl, rows = _DBS[db_id]
    tables = list(rows)
    return {"db_id": db_id, "table_names_original": tables, "table_names": tables}


@dataclass
class Archive:
    path: Path
    sha256: str
    train: list[dict[str, str]]
    dev: list[dict[str, str]]


def build_archive(folder: Path, name: str = "spider_data.zip", *, filler_mb: int = 0) -> Archive:
    """Write ``folder/<name>`` in the official layout; returns its path, SHA-256 and rows.

    ``filler_mb``: add an incompressible ``test_database/`` file of that size (the real
    archive's hidden-test databases are there too), for tests that need a large download."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "staging"
    train, dev = rows_for(TRAIN_DBS), rows_for(DEV_DBS)
    files: dict[str, bytes] = {
        "spider_data/train_spider.json": json.dumps(train, indent=4).encode(),
        "spider_data/train_others.json": b"[]",
        "spider_data/dev.json": json.dumps(dev, indent=4).encode(),
        "spider_data/tables.json": json.dumps([_tables_entry(d) for d in _DBS]).encode(),
        "spider_data/train_gold.sql": "".join(
            f"{r['query']}\t{r['db_id']}\n" for r in train
        ).encode(),
        "spider_data/dev_gold.sql": "".join(f"{r['query']}\t{r['db_id']}\n" for r in dev).encode(),
        "spider_data/README.txt": b"Spider 1.0 (test stand-in)\n",
        "__MACOSX/spider_data/._dev.json": b"\x00\x05\x16\x07",
    }
    for db_id in _DBS:
        db = make_database(staging / db_id / f"{db_id}.sqlite", db_id)
        files[f"spider_data/database/{db_id}/{db_id}.sqlite"] = db.read_bytes()
        files[f"spider_data/database/{db_id}/schema.sql"] = (
            ";\n".join(_DBS[db_id][0]) + ";\n"
        ).encode()
    if filler_mb:
        import random

        files["spider_data/test_database/filler/filler.sqlite"] = random.Random(0).randbytes(
            filler_mb << 20
        )
    path = folder / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("spider_data/", b"")
        for arcname, data in files.items():
            zf.writestr(arcname, data)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Archive(path, sha, train, dev)


@dataclass
class ArchiveServer:
    """Serve ``root``'s files on 127.0.0.1 (see the module docstring)."""

    root: Path
    cut_first_at: int | None = None  # drop the first full-body response after this many bytes
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = server.root / self.path.lstrip("/").split("?", 1)[0]
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng})
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-", 1)[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                ctype = "text/html" if path.suffix == ".html" else "application/zip"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cut_first_at is not None and not rng:
                    cut, server.cut_first_at = server.cut_first_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
