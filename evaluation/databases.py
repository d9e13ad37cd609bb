"""A user's database, opened read-only, for `text2sql ask` and the served model's ``db`` field.

``open_database(ref)`` takes a SQLite file path or an SQLAlchemy URL and returns an object
with ``schema(style)`` (the tables rendered as ``CREATE TABLE`` lines, the same renderer as
training uses: `dataset_utils.schema.render_schema`) and ``run(sql)`` (untrusted SQL, read-only,
time-limited, at most ``max_rows`` rows, never raises for what the SQL does).

- SQLite (a path, or ``sqlite:///path``): the evaluation sandbox (`evaluation.sandbox`):
  ``mode=ro`` URI, an authorizer that allows reads only, a wall-clock watchdog, row and byte
  caps. Not ``immutable``: the user's database may be live.
- PostgreSQL and MySQL/MariaDB URLs (SQLAlchemy ships with MLflow; the driver, e.g. psycopg
  or pymysql, is the user's): only a statement that starts with SELECT/WITH/VALUES is sent,
  inside a transaction the server itself makes read-only (``SET TRANSACTION READ ONLY``)
  with a server-side statement time limit, and the transaction is always rolled back.
  Use a database account that can only read, as with any tool that runs generated SQL.
- Any other dialect is refused: we cannot promise read-only there.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import time
from pathlib import Path
from typing import Any, Protocol

from dataset_utils.errors import UserError
from dataset_utils.schema import ForeignKey, Table, is_sqlite_file, read_tables, render_schema
from evaluation.sandbox import QueryResult, SandboxDB, check_statement

READ_ONLY_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")


class Database(Protocol):
    label: str

    def schema(self, style: str = "ddl") -> str: ...
    def run(self, sql: str, *, timeout_s: float = 5.0, max_rows: int = 20) -> QueryResult: ...
    def close(self) -> None: ...


def jsonable(value: Any) -> Any:
    """A result value as JSON can carry it (serving returns rows as JSON)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.date | dt.datetime | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


class SqliteDatabase:
    """A SQLite file behind the evaluation sandbox."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def schema(self, style: str = "ddl") -> str:
        return render_schema(read_tables(str(self.path)), style)

    def run(self, sql: str, *, timeout_s: float = 5.0, max_rows: int = 20) -> QueryResult:
        with SandboxDB.open(self.path, immutable=False) as db:
            return db.run(sql, timeout_s=timeout_s, max_rows=max_rows)

    def close(self) -> None:
        pass


class SqlAlchemyDatabase:
    """A PostgreSQL / MySQL database through SQLAlchemy, read-only per transaction."""

    def __init__(self, url: Any) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
        from sqlalchemy.pool import NullPool

        self.url = url
        self.dialect = url.get_backend_name()
        self.label = url.render_as_string(hide_password=True)
        try:
            self.engine = create_engine(url, poolclass=NullPool)
        except (NoSuchModuleError, ModuleNotFoundError, ArgumentError) as e:
            raise UserError(
                f"cannot open {self.label}: {e}. Install the database driver for "
                f"{url.drivername} (e.g. psycopg for postgresql, pymysql for mysql)"
            ) from None

    def schema(self, style: str = "ddl") -> str:
        from sqlalchemy import inspect
        from sqlalchemy.exc import SQLAlchemyError

        try:
            insp = inspect(self.engine)
            tables = []
            for name in insp.get_table_names():
                cols = tuple((c["name"], str(c["type"])) for c in insp.get_columns(name))
                pk = tuple(insp.get_pk_constraint(name).get("constrained_columns") or ())
                fks = tuple(
                    ForeignKey(src, fk["referred_table"], dst)
                    for fk in insp.get_foreign_keys(name)
                    for src, dst in zip(
                        fk["constrained_columns"], fk["referred_columns"], strict=False
                    )
                )
                tables.append(Table(name, cols, pk, fks))
        except SQLAlchemyError as e:
            raise UserError(f"cannot read the schema of {self.label}: {_first_line(e)}") from None
        return render_schema(tables, style)

    def _read_only(self, conn: Any, timeout_s: float) -> None:
        ms = max(1, int(timeout_s * 1000))
        if self.dialect == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        else:
            # MySQL / MariaDB: the session setting applies from the *next* transaction, so the
            # one SQLAlchemy began for these statements is ended before the query runs.
            conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
            if self.dialect == "mariadb":
                conn.exec_driver_sql(f"SET SESSION max_statement_time = {ms / 1000:.3f}")
            else:
                conn.exec_driver_sql(f"SET SESSION max_execution_time = {ms}")
            conn.commit()

    def run(self, sql: str, *, timeout_s: float = 5.0, max_rows: int = 20) -> QueryResult:
        from sqlalchemy.exc import SQLAlchemyError

        refusal = check_statement(sql)
        if refusal:
            return QueryResult(ok=False, error=refusal)
        start = time.monotonic()
        try:
            with self.engine.connect() as conn:
                try:
                    self._read_only(conn, timeout_s)
                    result = conn.exec_driver_sql(sql)
                    columns = list(result.keys()) if result.returns_rows else []
                    rows = [tuple(r) for r in result.fetchmany(max_rows + 1)] if columns else []
                finally:
                    conn.rollback()
        except SQLAlchemyError as e:
            elapsed = time.monotonic() - start
            timed_out = elapsed >= timeout_s
            return QueryResult(
                ok=False,
                error=f"timed out after {timeout_s:g}s" if timed_out else _first_line(e),
                timed_out=timed_out,
                elapsed_s=elapsed,
            )
        truncated = len(rows) > max_rows
        return QueryResult(
            ok=True,
            rows=rows[:max_rows],
            columns=columns,
            truncated=truncated,
            elapsed_s=time.monotonic() - start,
        )

    def close(self) -> None:
        self.engine.dispose()


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def open_database(ref: str) -> Database:
    """A SQLite path or an SQLAlchemy URL, opened read-only (see the module docstring)."""
    ref = str(ref).strip()
    if "://" in ref:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(ref)
        except ArgumentError as e:
            raise UserError(f"database URL {ref!r} is not a valid SQLAlchemy URL: {e}") from None
        backend = url.get_backend_name()
        if backend == "sqlite":
            if not url.database or url.database == ":memory:":
                raise UserError(f"database URL {ref!r} names no SQLite file")
            return _sqlite(Path(url.database))
        if backend not in READ_ONLY_DIALECTS:
            raise UserError(
                f"database URL {url.render_as_string(hide_password=True)!r}: cannot open "
                f"{backend} read-only; supported: a SQLite file, sqlite:///path, "
                "postgresql://..., mysql://..."
            )
        return SqlAlchemyDatabase(url)
    return _sqlite(Path(ref))


def _sqlite(path: Path) -> SqliteDatabase:
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"database file {path} does not exist")
    if not is_sqlite_file(path):
        raise UserError(f"{path} is not a SQLite database (no SQLite header)")
    return SqliteDatabase(path.resolve())


@functools.lru_cache(maxsize=32)
def cached_database(ref: str) -> Database:
    """`open_database`, kept open for a serving process that sees the same database often."""
    return open_database(ref)
