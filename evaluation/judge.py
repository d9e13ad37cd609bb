"""Judge predicted SQL against gold SQL: per example (`judge_example`) and per run (`score`).

How an example is executed (``Judgement.method``):

- ``real_db``: ``example.db_path`` is set (Spider-style): gold and prediction run on that file.
- ``inserts``: the context carries ``INSERT`` rows (gretel): it is executed into an in-memory
  database (`evaluation.synth_db.inserts_setup`), then both queries run there.
- ``synthetic_db``: schema-only contexts (sql-create-context, Clinton): several test-suite
  style random databases aimed at the gold query (`evaluation.synth_db`); the prediction is
  correct only if it matches gold on *every* database.

All execution goes through `evaluation.sandbox` (read-only, authorizer, time limit), and result
comparison follows `evaluation.execution` (multisets unless gold has a top-level ORDER BY;
column permutations tolerated; normalized values).

Every verdict also carries a category (``Judgement.category``, `ERROR_CATEGORIES`): ``correct``;
for a prediction that does not run, from the sandbox's error message (`categorize_error`): ``no
such table``, ``no such column``, ``syntax error`` (SQLite's "syntax error", "incomplete input",
"unrecognized token", or no SQL at all), ``timeout``, ``other execution error`` (everything
else: a refused non-query, a misused aggregate, an ambiguous column...); for one that runs:
``empty result`` (no rows where gold has some) or ``wrong result``; and ``unjudgeable``.

When the gold query itself fails (or exceeds the row cap) the example is **unjudgeable**:
``exec_correct is None``, counted in ``n`` but not in ``n_judgeable``, so execution accuracy
is ``correct / n_judgeable``. A prediction that errors, times out, is refused, or crashes the
judge is counted wrong -- a hostile prediction never aborts a run.

Gold results are cached (`GoldCache`, one per process by default), so scoring a base model and
an adapter on the same examples runs each gold query once.

Usage::

    from evaluation.judge import score
    result = score(examples, predicted_sql)
    print(result.overall.exec_accuracy, result.flat_metrics())
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dataset_utils.records import Example
from evaluation.db_variants import DEFAULT_SUITE_SIZE, suite_identity, suite_variants
from evaluation.execution import gold_is_ordered, results_match
from evaluation.sandbox import QueryResult, SandboxDB
from evaluation.sql_metrics import bleu, exact_match, is_valid_sql
from evaluation.synth_db import (
    DEFAULT_N_DBS,
    cache_key,
    has_inserts,
    inserts_setup,
    parse_schema,
    synthetic_databases,
)

METHODS = ("real_db", "synthetic_db", "inserts")
MAX_ROWS = 10_000
NO_LABEL = "(none)"
# Why a prediction is wrong, in report order; with "correct" and "unjudgeable" these are the
# values of `Judgement.category`.
ERROR_CATEGORIES = (
    "no such table",
    "no such column",
    "syntax error",
    "other execution error",
    "timeout",
    "wrong result",
    "empty result",
)
CATEGORIES = ("correct", *ERROR_CATEGORIES, "unjudgeable")
_SYNTAX = ("syntax error", "incomplete input", "unrecognized token")


def categorize_error(error: str | None) -> str:
    """The category of a prediction that did not run, from the sandbox's error message."""
    text = (error or "").lower()
    if text.startswith("timed out"):
        return "timeout"
    if "no such table" in text:
        return "no such table"
    if "no such column" in text:
        return "no such column"
    if text == "empty sql" or any(s in text for s in _SYNTAX):
        return "syntax error"
    return "other execution error"


@dataclass
class Judgement:
    """Verdict on one prediction.

    Attributes:
        exec_correct: same result as gold on every database; None when unjudgeable.
        executable: the prediction ran without error (or time-out) on every database it was run
            on (evaluation stops at the first database where it disagrees with gold).
        exact_match: equal to gold after `evaluation.sql_metrics.normalize_sql`.
        valid_sql: parses as one SQL statement.
        error: why the prediction failed, or why the example is unjudgeable; else None.
        method: ``real_db`` | ``synthetic_db`` | ``inserts``.
        pred_sql: the SQL that was judged.
        unjudgeable_reason: set when ``exec_correct is None`` (the gold query's problem).
        category: one of `CATEGORIES` (see the module docstring).
    """

    exec_correct: bool | None
    executable: bool
    exact_match: bool
    valid_sql: bool
    error: str | None
    method: str
    pred_sql: str = ""
    unjudgeable_reason: str | None = None
    category: str = ""


@dataclass
class Metrics:
    """Aggregates over a group of judgements. Rates are fractions in [0, 1]; BLEU is 0-100."""

    n: int
    n_judgeable: int
    n_correct: int
    exec_accuracy: float
    exact_match: float
    valid_sql_rate: float
    executable_rate: float
    bleu: float


@dataclass
class EvalResult:
    """Per-example judgements plus aggregates overall, per difficulty (word count), per Spider
    hardness level, per complexity and per source."""

    judgements: list[Judgement]
    overall: Metrics
    by_difficulty: dict[str, Metrics] = field(default_factory=dict)
    by_complexity: dict[str, Metrics] = field(default_factory=dict)
    by_source: dict[str, Metrics] = field(default_factory=dict)
    by_hardness: dict[str, Metrics] = field(default_factory=dict)

    def categories(self) -> dict[str, int]:
        """How many judgements fall in each of `CATEGORIES` (all of them, zeros included)."""
        counts = dict.fromkeys(CATEGORIES, 0)
        for j in self.judgements:
            counts[j.category] = counts.get(j.category, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": asdict(self.overall),
            "by_difficulty": {k: asdict(v) for k, v in self.by_difficulty.items()},
            "by_hardness": {k: asdict(v) for k, v in self.by_hardness.items()},
            "by_complexity": {k: asdict(v) for k, v in self.by_complexity.items()},
            "by_source": {k: asdict(v) for k, v in self.by_source.items()},
            "categories": self.categories(),
            "judgements": [asdict(j) for j in self.judgements],
        }

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metric names for loggers (``execution_accuracy``, ``execution_accuracy_easy``)."""
        o = self.overall
        out: dict[str, float] = {
            f"{prefix}execution_accuracy": o.exec_accuracy,
            f"{prefix}exact_match": o.exact_match,
            f"{prefix}valid_sql": o.valid_sql_rate,
            f"{prefix}executable": o.executable_rate,
            f"{prefix}bleu": o.bleu,
            f"{prefix}n": float(o.n),
            f"{prefix}n_judgeable": float(o.n_judgeable),
        }
        for group in (self.by_difficulty, self.by_complexity):
            for label, m in group.items():
                if label != NO_LABEL:
                    out[f"{prefix}execution_accuracy_{label}"] = m.exec_accuracy
        for label, m in self.by_source.items():
            if label != NO_LABEL:
                out[f"{prefix}execution_accuracy_{label}"] = m.exec_accuracy
                out[f"{prefix}executable_{label}"] = m.executable_rate
        # Spider hardness shares level names with the word-count difficulty: its own prefix.
        for label, m in self.by_hardness.items():
            if label != NO_LABEL:
                out[f"{prefix}execution_accuracy_hardness_{label}"] = m.exec_accuracy
        n = max(1, self.overall.n)
        for category, count in self.categories().items():
            if category in ERROR_CATEGORIES:
                out[f"{prefix}error_{category.replace(' ', '_')}"] = count / n
        return out


class GoldCache:
    """Bounded LRU of gold results per (method, database identity, gold SQL, limits)."""

    def __init__(self, maxsize: int = 20_000) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[tuple[Any, ...], list[QueryResult]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_run(
        self, key: tuple[Any, ...], run: Callable[[], list[QueryResult]]
    ) -> list[QueryResult]:
        if key in self._data:
            self.hits += 1
            self._data.move_to_end(key)
            return self._data[key]
        self.misses += 1
        value = run()
        self._data[key] = value
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_DEFAULT_GOLD_CACHE = GoldCache()


def default_gold_cache() -> GoldCache:
    return _DEFAULT_GOLD_CACHE


def method_for(example: Example) -> str:
    """Which execution method `judge_example` uses for this example."""
    if example.db_path:
        return "real_db"
    if example.context and has_inserts(example.context):
        return "inserts"
    return "synthetic_db"


@lru_cache(maxsize=4096)
def _schema_columns(context: str) -> tuple[str, ...]:
    return tuple(c.name for t in parse_schema(context).values() for c in t.columns)


@lru_cache(maxsize=1024)
def _inserts_setup_cached(context: str) -> tuple[str, ...]:
    return tuple(inserts_setup(context))


@lru_cache(maxsize=8192)
def _ordered(gold_sql: str) -> bool:
    return gold_is_ordered(gold_sql)


def _file_identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class _Target:
    """The database(s) one example runs on, with a stable identity for the gold cache."""

    def __init__(
        self, example: Example, *, n_dbs: int, suite_size: int, seed: int, timeout_s: float
    ) -> None:
        self.method = method_for(example)
        self.example = example
        self.suite_size = suite_size
        self.seed = seed
        self.paths: list[Path] = []
        self.setup: tuple[str, ...] = ()
        if self.method == "real_db":
            assert example.db_path is not None
            self.paths = [Path(example.db_path)]
            self.identity: tuple[Any, ...] = (
                suite_identity(example.db_path, suite_size, seed)
                if suite_size > 0
                else _file_identity(example.db_path)
            )
            self.size = 1 + max(0, suite_size)
        elif self.method == "inserts":
            self.setup = _inserts_setup_cached(example.context)
            self.identity = (hashlib.sha256(example.context.encode()).hexdigest(),)
            self.size = 1
        else:
            self.paths = synthetic_databases(
                example.context, example.sql, n=n_dbs, seed=seed, timeout_s=timeout_s
            )
            self.identity = (cache_key(example.context, example.sql, n_dbs, seed),)
            self.size = len(self.paths)

    def _open(self, i: int) -> SandboxDB:
        if self.method == "inserts":
            return SandboxDB.from_script(self.setup)
        if i < len(self.paths):
            return SandboxDB.open(self.paths[i])
        # Test-suite variants of the real database, built only when a query gets this far.
        assert self.example.db_path is not None
        blobs = suite_variants(
            self.example.db_path, self.example.sql, n=self.suite_size, seed=self.seed
        )
        return SandboxDB.from_bytes(blobs[i - len(self.paths)])

    def run_all(
        self, sql: str, timeout_s: float, stop: Callable[[int, QueryResult], bool] | None = None
    ) -> list[QueryResult]:
        """Run ``sql`` on each database in turn; ``stop(i, result)`` True ends early."""
        out: list[QueryResult] = []
        for i in range(self.size):
            try:
                db = self._open(i)
            except sqlite3.Error as e:
                res = QueryResult(ok=False, error=f"database setup failed: {e}")
            else:
                with db:
                    res = db.run(sql, timeout_s=timeout_s, max_rows=MAX_ROWS)
            out.append(res)
            if stop is not None and stop(i, res):
                break
        return out


def _gold_problem(method: str, gold: list[QueryResult]) -> str | None:
    # On a real database only the real file must work; a suite variant where gold fails
    # (a time-out on a reshaped table, say) is skipped instead (see `judge_example`).
    for res in gold[:1] if method == "real_db" else gold:
        if not res.ok:
            return f"gold query failed: {res.error}"
        if res.truncated:
            return f"gold result exceeds {MAX_ROWS} rows"
    return None


def judge_example(
    example: Example,
    pred_sql: str,
    *,
    timeout_s: float = 2.0,
    n_dbs: int = DEFAULT_N_DBS,
    suite_size: int = DEFAULT_SUITE_SIZE,
    seed: int = 0,
    gold_cache: GoldCache | None = None,
) -> Judgement:
    """Judge one prediction (see the module docstring). Never raises for a bad prediction."""
    pred_sql = pred_sql or ""
    method = "unknown"
    valid = exact = False
    try:
        method = method_for(example)
        valid = is_valid_sql(pred_sql)
        known = _schema_columns(example.context) if example.context else None
        exact = exact_match(pred_sql, example.sql, known_columns=known)
        target = _Target(
            example, n_dbs=n_dbs, suite_size=suite_size, seed=seed, timeout_s=timeout_s
        )
    except Exception as e:  # noqa: BLE001 - e.g. an unparseable context: the example's problem
        reason = f"no database for this example: {type(e).__name__}: {e}"[:300]
        return Judgement(None, False, exact, valid, reason, method, pred_sql, reason, "unjudgeable")

    cache = gold_cache if gold_cache is not None else _DEFAULT_GOLD_CACHE
    key = (target.method, target.identity, example.sql, MAX_ROWS, timeout_s)
    try:
        gold = cache.get_or_run(key, lambda: target.run_all(example.sql, timeout_s))
    except Exception as e:  # noqa: BLE001
        gold = [QueryResult(ok=False, error=f"{type(e).__name__}: {e}")]
    problem = _gold_problem(target.method, gold)

    ordered = _ordered(example.sql)
    agrees: list[bool] = []

    def stop(i: int, res: QueryResult) -> bool:
        # Stop at the first database where the prediction fails or disagrees with gold.
        if not res.ok or res.truncated:
            return True
        if problem is not None:
            return False
        if not gold[i].ok or gold[i].truncated:
            agrees.append(True)  # a suite variant gold cannot run on: not evidence either way
            return False
        agrees.append(results_match(res.rows, gold[i].rows, ordered=ordered))
        return not agrees[-1]

    try:
        preds = target.run_all(pred_sql, timeout_s, stop=stop)
    except Exception as e:  # noqa: BLE001 - a judge bug must not abort the evaluation
        err = f"judge error: {type(e).__name__}: {e}"[:300]
        verdict, category = (None, "unjudgeable") if problem else (False, "other execution error")
        return Judgement(verdict, False, exact, valid, err, method, pred_sql, problem, category)
    failed = next((r for r in preds if not r.ok), None)
    executable = failed is None
    error = failed.error if failed is not None else None
    if problem is not None:
        return Judgement(
            None,
            executable,
            exact,
            valid,
            error or problem,
            method,
            pred_sql,
            problem,
            "unjudgeable",
        )
    if failed is not None:
        category = categorize_error(error)
        return Judgement(False, False, exact, valid, error, method, pred_sql, None, category)
    if any(r.truncated for r in preds):
        return Judgement(
            False,
            True,
            exact,
            valid,
            f"result exceeds {MAX_ROWS} rows",
            method,
            pred_sql,
            None,
            "wrong result",
        )
    correct = len(agrees) == len(gold) and all(agrees)
    if correct:
        return Judgement(True, True, exact, valid, None, method, pred_sql, None, "correct")
    # Wrong on the database where it first disagreed with gold: empty or not?
    last = len(preds) - 1
    empty = not preds[last].rows and bool(gold[last].rows)
    category = "empty result" if empty else "wrong result"
    return Judgement(False, True, exact, valid, None, method, pred_sql, None, category)


def _metrics(judgements: Sequence[Judgement], preds: Sequence[str], refs: Sequence[str]) -> Metrics:
    n = len(judgements)
    judgeable = [j for j in judgements if j.exec_correct is not None]
    correct = sum(1 for j in judgeable if j.exec_correct)

    def rate(k: int, d: int) -> float:
        return k / d if d else 0.0

    return Metrics(
        n=n,
        n_judgeable=len(judgeable),
        n_correct=correct,
        exec_accuracy=rate(correct, len(judgeable)),
        exact_match=rate(sum(j.exact_match for j in judgements), n),
        valid_sql_rate=rate(sum(j.valid_sql for j in judgements), n),
        executable_rate=rate(sum(j.executable for j in judgements), n),
        bleu=bleu(preds, refs) if n else 0.0,
    )


def _grouped(
    labels: Sequence[str | None],
    judgements: Sequence[Judgement],
    preds: Sequence[str],
    refs: Sequence[str],
) -> dict[str, Metrics]:
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label if label else NO_LABEL, []).append(i)
    return {
        label: _metrics(
            [judgements[i] for i in idx], [preds[i] for i in idx], [refs[i] for i in idx]
        )
        for label, idx in groups.items()
    }


def score(
    examples: Sequence[Example],
    predictions: Sequence[str],
    *,
    timeout_s: float = 2.0,
    n_dbs: int = DEFAULT_N_DBS,
    suite_size: int = DEFAULT_SUITE_SIZE,
    seed: int = 0,
    gold_cache: GoldCache | None = None,
    progress: bool = False,
) -> EvalResult:
    """Judge every prediction and aggregate (see the module docstring and `Metrics`).

    ``by_complexity`` / ``by_hardness`` are filled only when some example has a
    ``complexity`` / ``hardness`` label; examples without a difficulty (or complexity, or
    hardness) are grouped under ``"(none)"``.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    items: Any = zip(examples, predictions, strict=True)
    if progress:
        items = tqdm(items, total=len(examples), desc="judging", unit="example")
    judgements = [
        judge_example(
            ex,
            pred,
            timeout_s=timeout_s,
            n_dbs=n_dbs,
            suite_size=suite_size,
            seed=seed,
            gold_cache=gold_cache,
        )
        for ex, pred in items
    ]
    preds = [p or "" for p in predictions]
    refs = [ex.sql for ex in examples]
    by_complexity: dict[str, Metrics] = {}
    if any(ex.complexity for ex in examples):
        by_complexity = _grouped([ex.complexity for ex in examples], judgements, preds, refs)
    by_hardness: dict[str, Metrics] = {}
    if any(ex.hardness for ex in examples):
        by_hardness = _grouped([ex.hardness for ex in examples], judgements, preds, refs)
    return EvalResult(
        judgements=judgements,
        overall=_metrics(judgements, preds, refs),
        by_difficulty=_grouped([ex.difficulty for ex in examples], judgements, preds, refs),
        by_complexity=by_complexity,
        by_source=_grouped([ex.source for ex in examples], judgements, preds, refs),
        by_hardness=by_hardness,
    )
