"""Locked-down SQLite execution for untrusted (model-generated) SQL.

Every SQL statement the evaluation runs goes through this module. Defences, each independent:

1. The statement must be a single query: its first keyword must be ``SELECT``, ``WITH`` or
   ``VALUES`` (comments and parentheses skipped), and SQLite itself refuses a second statement
   (``sqlite3`` raises "You can only execute one statement at a time").
2. Database files are opened read-only through a URI (``mode=ro&immutable=1``): SQLite cannot
   write, take locks or create ``-wal``/``-journal`` files beside the database.
3. An authorizer allows only reads (``SELECT``, ``READ``, ``FUNCTION``, ``RECURSIVE``) and
   denies everything else: writes, DDL, ``ATTACH``/``DETACH`` (which also blocks
   ``VACUUM INTO``), every ``PRAGMA``, transactions, savepoints, and the SQL functions
   ``load_extension()`` and ``printf()``/``format()`` (see `_DENIED_FUNCTIONS`). Extension
   loading is also left disabled on the connection.
4. Resource limits: at ``timeout_s`` of wall-clock time a watchdog thread calls
   ``sqlite3_interrupt`` on the connection, which SQLite checks at every loop jump of its VM,
   during ``execute`` *and* while rows are fetched, so infinite recursive CTEs and huge cross
   joins stop on time; a progress handler (every few hundred VM instructions) checks the same
   deadline as a second line. A progress handler alone is not enough: with an expensive
   function in each row, a few hundred instructions can take half a second. At most
   ``max_rows`` rows and ``max_bytes`` bytes are fetched; SQLite's own limits cap string/blob
   length (64 kB) and SQL text length, so one expression can neither allocate gigabytes nor
   run a single super-linear function call for long. Residual risk: a built-in function is one
   VM instruction, so a time limit can be overshot by that one call (~40 ms for ``instr`` on
   the largest strings the limit allows, on the reference machine); a hard guarantee would
   need a separate process per query.

In-memory databases (`SandboxDB.from_script`, `SandboxDB.from_bytes`) run their trusted setup
first and are then locked exactly like files (plus ``PRAGMA query_only``).

Usage::

    from evaluation.sandbox import run_readonly
    res = run_readonly("concert_singer.sqlite", "SELECT count(*) FROM singer", timeout_s=2.0)
    if res.ok:
        print(res.columns, res.rows)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

# SQLite authorizer action codes that only read (see sqlite3.h). Everything else is denied.
_ALLOWED_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        getattr(sqlite3, "SQLITE_RECURSIVE", 33),
    }
)
# SQL functions refused even though SQLITE_FUNCTION is allowed. load_extension is the only
# built-in with side effects outside the database (extension loading is also off). printf and
# its alias format run as one VM instruction, out of the progress handler's reach: a huge
# width/precision (printf('%.*c', 2e9, 'x')) spins for ~15 s whatever the length limit.
# Text-to-SQL answers never need them (a formatted string never equals a numeric gold value).
_DENIED_FUNCTIONS = frozenset({"load_extension", "printf", "format"})

# How many SQLite VM instructions between two progress-handler calls. Small enough that a
# statement overshoots its deadline by microseconds, large enough to cost nothing measurable.
_PROGRESS_EVERY = 500

# sqlite3.SQLITE_LIMIT_* values are exported from Python 3.11 on.
_LIMITS = {
    # One string/blob value at most 64 kB (Spider's longest value has 60 characters). Besides
    # capping memory (zeroblob(1e9)), this bounds single-instruction functions whose cost is
    # super-linear in their input: instr() on two 4 MiB strings takes ~2 minutes, on 64 kB
    # strings a few milliseconds.
    "SQLITE_LIMIT_LENGTH": 64_000,
    # Model output is a few hundred tokens; 100 kB of SQL is already absurd.
    "SQLITE_LIMIT_SQL_LENGTH": 100_000,
    "SQLITE_LIMIT_ATTACHED": 0,
}

# Leading comments, whitespace and opening parentheses before the first keyword.
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.DOTALL)
_QUERY_START = re.compile(r"(?:SELECT|WITH|VALUES)\b", re.IGNORECASE)


@dataclass
class QueryResult:
    """Outcome of one sandboxed statement.

    Attributes:
        ok: the statement ran to completion (possibly truncated) without error.
        rows: fetched rows (at most ``max_rows``), as tuples of Python values.
        columns: result column names.
        error: why it failed (refused, SQL error, timed out, too large), else None.
        timed_out: stopped by the wall-clock limit.
        truncated: more rows existed than ``max_rows`` (``ok`` stays True; the rows are a prefix).
        elapsed_s: wall-clock seconds spent in SQLite.
    """

    ok: bool
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False
    truncated: bool = False
    elapsed_s: float = 0.0


def _authorizer(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def check_statement(sql: str) -> str | None:
    """Return why ``sql`` is refused before it reaches SQLite, or None when it may run."""
    if not sql or not sql.strip():
        return "empty SQL"
    rest = sql[_LEADING_NOISE.match(sql).end() :]  # type: ignore[union-attr]
    if not _QUERY_START.match(rest):
        word = rest.split(None, 1)[0][:30] if rest.split() else ""
        return f"refused: only SELECT/WITH/VALUES queries may run (statement starts with {word!r})"
    return None


class _Watchdog:
    """One daemon thread that interrupts connections whose statement ran past its deadline.

    `arm` registers a running statement and returns a token; `disarm` removes it. The
    interrupt is sent under the same lock, so it can never hit a statement that `disarm`
    already released (a stale flag on a finished statement is cleared by SQLite itself when
    the statement is reset).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._active: dict[int, sqlite3.Connection] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, conn: sqlite3.Connection, deadline: float) -> int:
        with self._cond:
            token = next(self._ids)
            self._active[token] = conn
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="sql-sandbox-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._active.pop(token, None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                # Drop entries whose statement already finished.
                while self._heap and self._heap[0][1] not in self._active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                now = time.monotonic()
                if now < deadline:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                conn = self._active.pop(token)
                with contextlib.suppress(sqlite3.Error):  # closed meanwhile: nothing to stop
                    conn.interrupt()


_WATCHDOG = _Watchdog()


def _value_size(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value) + 16
    return 16


class SandboxDB:
    """A locked-down SQLite connection. Prefer `run_readonly` for one-off statements.

    Use as a context manager, or call `close`. One `SandboxDB` may run many statements (the
    evaluation re-uses one per synthetic database); each `run` has its own deadline.
    """

    def __init__(self, conn: sqlite3.Connection, label: str) -> None:
        self._conn = conn
        self.label = label
        self._deadline = float("inf")
        self._lock_down()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def open(cls, db_path: str | Path, *, immutable: bool = True) -> SandboxDB:
        """Open an existing SQLite file read-only (and, by default, immutable: no locks, no
        journal).

        ``immutable=False`` is for a user's live database (`text2sql ask`, serving): SQLite
        then takes shared locks and reads a write-ahead log other processes may be writing,
        so results are current; the connection still cannot write.
        """
        path = Path(db_path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"SQLite database not found: {path}")
        # immutable=1: SQLite assumes nobody changes the file, so it never locks it or looks
        # for a hot journal; the evaluation databases are static, and the flag keeps a
        # read-only directory (like ../shared) working.
        uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        return cls(conn, str(path))

    @classmethod
    def from_script(cls, script: str | Iterable[str]) -> SandboxDB:
        """Build an in-memory database from *trusted* setup SQL, then lock it down.

        ``script`` is a whole script (run with ``executescript``) or statements run one by one.
        Raises `sqlite3.Error` when the setup fails.
        """
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            if isinstance(script, str):
                conn.executescript(script)
            else:
                for stmt in script:
                    conn.execute(stmt)
            # Belt and braces on top of the authorizer: the connection refuses any write.
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return cls(conn, ":memory:")

    @classmethod
    def from_bytes(cls, data: bytes) -> SandboxDB:
        """Open a serialized database (`sqlite3.Connection.serialize`) in memory, locked down.

        The copy is private to this connection, so nothing can reach the original.
        """
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            conn.deserialize(data)
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return cls(conn, ":memory:")

    def _lock_down(self) -> None:
        conn = self._conn
        # Python builds without extension support lack the method: nothing to disable then.
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(False)
        for name, value in _LIMITS.items():
            code = getattr(sqlite3, name, None)
            if code is not None:
                conn.setlimit(code, value)
        conn.set_authorizer(_authorizer)
        conn.set_progress_handler(self._progress, _PROGRESS_EVERY)

    def _progress(self) -> int:
        # Non-zero aborts the running statement with "interrupted".
        return 1 if time.monotonic() > self._deadline else 0

    # -- running ----------------------------------------------------------------------------

    def run(
        self,
        sql: str,
        *,
        timeout_s: float = 2.0,
        max_rows: int = 10_000,
        max_bytes: int = 64 << 20,
    ) -> QueryResult:
        """Run one read-only statement; never raises for anything the SQL does."""
        refusal = check_statement(sql)
        if refusal:
            return QueryResult(ok=False, error=refusal)
        start = time.monotonic()
        self._deadline = start + timeout_s
        token = _WATCHDOG.arm(self._conn, self._deadline)
        cur: sqlite3.Cursor | None = None
        rows: list[tuple[Any, ...]] = []
        truncated = False
        try:
            cur = self._conn.execute(sql)
            columns = [d[0] for d in cur.description or ()]
            size = 0
            while True:
                # Fetch in chunks so the byte budget is checked as rows arrive; one row past
                # max_rows tells us the result was truncated.
                chunk = cur.fetchmany(min(1024, max_rows + 1 - len(rows)))
                if not chunk:
                    break
                for row in chunk:
                    size += sum(_value_size(v) for v in row)
                if size > max_bytes:
                    return QueryResult(
                        ok=False,
                        error=f"result larger than {max_bytes} bytes",
                        elapsed_s=time.monotonic() - start,
                    )
                rows.extend(chunk)
                if len(rows) > max_rows:
                    rows = rows[:max_rows]
                    truncated = True
                    break
        except (sqlite3.Error, sqlite3.Warning) as e:
            elapsed = time.monotonic() - start
            timed_out = "interrupted" in str(e).lower() and elapsed >= timeout_s
            message = f"timed out after {timeout_s:g}s" if timed_out else _describe(e)
            return QueryResult(ok=False, error=message, timed_out=timed_out, elapsed_s=elapsed)
        except (ValueError, OverflowError, MemoryError) as e:
            # e.g. a TEXT value that is not valid UTF-8, or an integer too large for Python.
            return QueryResult(ok=False, error=_describe(e), elapsed_s=time.monotonic() - start)
        finally:
            _WATCHDOG.disarm(token)
            self._deadline = float("inf")
            if cur is not None:
                cur.close()
        return QueryResult(
            ok=True,
            rows=rows,
            columns=columns,
            truncated=truncated,
            elapsed_s=time.monotonic() - start,
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SandboxDB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


def run_readonly(
    db_path: str | Path,
    sql: str,
    *,
    timeout_s: float = 2.0,
    max_rows: int = 10_000,
    max_bytes: int = 64 << 20,
) -> QueryResult:
    """Run one untrusted statement against a SQLite file, read-only (see the module docstring).

    Never raises for anything the SQL does (refusals, errors and time-outs come back in the
    `QueryResult`); a missing database file raises `FileNotFoundError`.
    """
    with SandboxDB.open(db_path) as db:
        return db.run(sql, timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes)


def run_in_memory(
    setup: str | Iterable[str],
    sql: str,
    *,
    timeout_s: float = 2.0,
    max_rows: int = 10_000,
    max_bytes: int = 64 << 20,
) -> QueryResult:
    """Build an in-memory database from trusted ``setup`` SQL, then run untrusted ``sql``.

    A failing setup comes back as ``ok=False`` with ``error`` starting with ``setup failed``.
    """
    try:
        db = SandboxDB.from_script(setup)
    except sqlite3.Error as e:
        return QueryResult(ok=False, error=f"setup failed: {_describe(e)}")
    with db:
        return db.run(sql, timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes)
