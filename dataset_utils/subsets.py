"""Difficulty subsets, de-duplication and leakage-free train/valid/test splits.

Difficulty follows the Determined text-to-SQL recipe: the total number of whitespace-separated
words of instruction (question) + input (schema) + response (SQL) puts a row in

    easy: 10-100 words, medium: 101-200, hard: 201-800

(rows outside 10-800 words belong to no bucket). ``subset="all"`` keeps every row. Datasets
with their own complexity labels (gretel's ``sql_complexity``) can be filtered by those labels
instead with ``complexity=[...]``.

Splits are 80/10/10 with seed 123 by default, like the recipe (which uses
``datasets.Dataset.train_test_split`` twice; so do we, on groups). Before splitting, rows whose
normalized (question, schema) pair repeats are dropped, so no pair can land in two splits.
With ``group_by="sql"`` every row sharing the same (schema, normalized gold SQL) -- Spider's
paraphrased questions -- stays in one split, so the test set never contains a query the model
was trained on under a different wording. With ``group_by="db"`` every database (Spider's
``db_id``; the schema text for rows without one) stays in one split: validation and test are
then cross-database, as Spider's own train/dev split is.

Sources can also be given wholly to one split (``use: train|valid|test``, `assign_splits`), e.g.
Spider train for training and Spider dev for testing; `stratified_sample` then draws a fixed,
reproducible test subset stratified by database and Spider hardness.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

from dataset_utils.errors import UserError
from dataset_utils.records import Example

DIFFICULTY_BUCKETS: dict[str, tuple[int, int]] = {
    "easy": (10, 100),
    "medium": (101, 200),
    "hard": (201, 800),
}
SUBSETS = (*DIFFICULTY_BUCKETS, "all")
GROUP_BY = ("none", "sql", "db")

_WS = re.compile(r"\s+")


def word_count(example: Example) -> int:
    """Words of question + schema + SQL, as the recipe counts instruction+input+response."""
    return sum(len(str(t).split()) for t in (example.question, example.context, example.sql))


def difficulty_of(example: Example) -> str | None:
    n = word_count(example)
    for name, (lo, hi) in DIFFICULTY_BUCKETS.items():
        if lo <= n <= hi:
            return name
    return None


def with_difficulty(examples: Sequence[Example]) -> list[Example]:
    return [replace(e, difficulty=difficulty_of(e)) for e in examples]


def normalize_text(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def pair_key(example: Example) -> tuple[str, str]:
    """The identity used for leakage checks: normalized (question, schema)."""
    return normalize_text(example.question), normalize_text(example.context)


def sql_group_key(example: Example) -> tuple[str, str]:
    """Rows asking for the same query on the same schema (paraphrases)."""
    sql = normalize_text(example.sql).rstrip(";").replace('"', "'")
    return normalize_text(example.context), _WS.sub("", sql)


def db_group_key(example: Example) -> str:
    """The database a row belongs to: its ``db_id``, else its schema text."""
    return f"db:{example.db_id}" if example.db_id else f"schema:{normalize_text(example.context)}"


def group_key(example: Example, group_by: str) -> Hashable:
    """What must not straddle two splits under ``group_by`` (the row itself for ``none``)."""
    if group_by == "sql":
        return sql_group_key(example)
    if group_by == "db":
        return db_group_key(example)
    return pair_key(example)


def select_subset(
    examples: Sequence[Example],
    subset: str = "all",
    number_of_samples: int | None = None,
    complexity: Sequence[str] | None = None,
    counted: Sequence[bool] | None = None,
) -> list[Example]:
    """Filter by difficulty bucket (and/or the dataset's own complexity labels), then keep the
    first ``number_of_samples`` rows, as the recipe does.

    ``counted``: per input row, whether ``number_of_samples`` applies to it (rows given wholly
    to validation or test are filtered by difficulty but never cut); None: every row.
    """
    return select_subset_indices(examples, subset, number_of_samples, complexity, counted)[0]


def select_subset_indices(
    examples: Sequence[Example],
    subset: str = "all",
    number_of_samples: int | None = None,
    complexity: Sequence[str] | None = None,
    counted: Sequence[bool] | None = None,
) -> tuple[list[Example], list[int]]:
    """`select_subset`, also returning which input rows were kept (in order)."""
    rows = with_difficulty(examples)
    kept = _subset_indices(rows, subset, number_of_samples, complexity, counted)
    return [rows[i] for i in kept], kept


def _subset_indices(
    rows: Sequence[Example],
    subset: str,
    number_of_samples: int | None,
    complexity: Sequence[str] | None,
    counted: Sequence[bool] | None,
) -> list[int]:
    if subset not in SUBSETS:
        raise UserError(
            f"unknown difficulty subset {subset!r}; expected one of {', '.join(SUBSETS)}"
        )
    kept = list(range(len(rows)))
    if subset != "all":
        kept = [i for i in kept if rows[i].difficulty == subset]
    if complexity:
        # Labels of every input row, not only of the difficulty bucket: an empty bucket must
        # be reported as empty, not as "these rows carry no complexity labels".
        labels = {e.complexity for e in rows if e.complexity}
        unknown = [c for c in complexity if c not in labels]
        if not labels:
            raise UserError(
                "complexity filter given, but these rows carry no complexity labels "
                "(only gretel's sql_complexity has them)"
            )
        if unknown:
            raise UserError(
                f"unknown complexity label(s) {unknown}; this data has: {sorted(labels)}"
            )
        kept = [i for i in kept if rows[i].complexity in set(complexity)]
    if number_of_samples is not None:
        if number_of_samples <= 0:
            raise UserError(f"number_of_samples must be positive, found {number_of_samples}")
        flags = counted if counted is not None else [True] * len(rows)
        seen = 0
        limited = []
        for i in kept:
            if flags[i]:
                if seen >= number_of_samples:
                    continue
                seen += 1
            limited.append(i)
        kept = limited
    if not kept:
        what = f"subset {subset!r}" + (f" with complexity {list(complexity)}" if complexity else "")
        raise UserError(
            f"{what} is empty after filtering {len(rows)} rows "
            f"(word-count buckets: {DIFFICULTY_BUCKETS})"
        )
    return kept


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Drop repeated (question, schema) pairs, keeping the first. Returns (rows, removed)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for e in examples:
        k = pair_key(e)
        if k in seen:
            continue
        seen.add(k)
        kept.append(e)
    return kept, len(examples) - len(kept)


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    duplicates_removed: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, list[Example]]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def split_examples(
    examples: Sequence[Example],
    *,
    train: float = 0.8,
    valid: float = 0.1,
    test: float = 0.1,
    seed: int = 123,
    group_by: str = "none",
) -> Splits:
    """De-duplicate, then split into train/valid/test (fractions of groups)."""
    if group_by not in GROUP_BY:
        raise UserError(f"unknown group_by {group_by!r}; expected one of {', '.join(GROUP_BY)}")
    for name, frac in (("train", train), ("valid", valid), ("test", test)):
        if not 0 <= frac <= 1:
            raise UserError(f"split fraction {name}={frac} must be between 0 and 1")
    if abs(train + valid + test - 1.0) > 1e-6:
        raise UserError(f"split fractions must sum to 1, found {train}+{valid}+{test}")
    rows, removed = deduplicate(examples)
    if not rows:
        raise UserError("no examples to split")

    groups: dict[object, list[int]] = {}
    for i, e in enumerate(rows):
        key: object = group_key(e, group_by) if group_by != "none" else i
        groups.setdefault(key, []).append(i)
    group_ids = list(groups)
    n = len(group_ids)
    if n < 3 and (valid > 0 or test > 0):
        raise UserError(f"need at least 3 distinct examples to split, found {n}")

    import datasets

    idx = datasets.Dataset.from_dict({"g": list(range(n))})
    if train >= 1.0:
        parts = {"train": list(range(n)), "valid": [], "test": []}
    else:
        first = idx.train_test_split(train_size=train, seed=seed) if train > 0 else None
        rest = first["test"] if first is not None else idx
        if valid == 0 or test == 0:
            parts = {
                "train": first["train"]["g"] if first is not None else [],
                "valid": rest["g"] if valid > 0 else [],
                "test": rest["g"] if test > 0 else [],
            }
        else:
            second = rest.train_test_split(test_size=test / (test + valid), seed=seed)
            parts = {
                "train": first["train"]["g"] if first is not None else [],
                "valid": second["train"]["g"],
                "test": second["test"]["g"],
            }
    out = {
        name: [rows[i] for g in gids for i in groups[group_ids[g]]] for name, gids in parts.items()
    }
    return Splits(
        train=out["train"],
        valid=out["valid"],
        test=out["test"],
        duplicates_removed=removed,
        stats={
            "rows_in": len(examples),
            "duplicates_removed": removed,
            "groups": n,
            **{f"n_{k}": len(v) for k, v in out.items()},
        },
    )


SPLIT_NAMES = ("train", "valid", "test")


def assign_splits(
    pool: Sequence[Example],
    fixed: dict[str, Sequence[Example]] | None = None,
    *,
    train: float = 0.8,
    valid: float = 0.1,
    test: float = 0.1,
    seed: int = 123,
    group_by: str = "none",
) -> Splits:
    """Ratio-split ``pool`` (`split_examples`), then add the rows given wholly to a split.

    ``fixed`` maps ``train`` / ``valid`` / ``test`` to rows that go to that split as they are
    (de-duplicated). No (question, schema) pair -- and, under ``group_by``, no gold query
    (``sql``) or database (``db``) -- is in two splits: a row that would share one with a later
    split in the order test, valid, train is dropped from the earlier one and counted in
    ``stats["dropped_overlap"]`` (test rows are never dropped). Under ``group_by="db"`` the
    validation rows are interleaved database by database, so the first N of them (the
    in-training generation subset) span several databases.
    """
    fixed = {k: list(v) for k, v in (fixed or {}).items() if v}
    unknown = sorted(set(fixed) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {SPLIT_NAMES}")
    if pool:
        base = split_examples(
            pool, train=train, valid=valid, test=test, seed=seed, group_by=group_by
        )
    elif not fixed:
        raise UserError("no examples to split")
    else:
        base = Splits(train=[], valid=[], test=[])
    removed = base.duplicates_removed
    parts = base.as_dict()
    for name, rows in fixed.items():
        kept, n = deduplicate(rows)
        parts[name] = parts[name] + kept
        removed += n
    pair_owner: dict[Hashable, str] = {}
    group_owner: dict[Hashable, str] = {}
    dropped = 0
    for name in ("test", "valid", "train"):
        kept = []
        for e in parts[name]:
            pair, group = pair_key(e), group_key(e, group_by)
            if pair in pair_owner:  # the same row from two sources
                if pair_owner[pair] == name:
                    removed += 1
                else:
                    dropped += 1
                continue
            if group_owner.get(group, name) != name:
                dropped += 1
                continue
            pair_owner[pair] = name
            group_owner.setdefault(group, name)
            kept.append(e)
        parts[name] = kept
    if group_by == "db":
        parts["valid"] = _interleave(parts["valid"], db_group_key)
    return Splits(
        train=parts["train"],
        valid=parts["valid"],
        test=parts["test"],
        duplicates_removed=removed,
        stats={
            **base.stats,
            "duplicates_removed": removed,
            "dropped_overlap": dropped,
            **{f"n_{k}": len(v) for k, v in parts.items()},
        },
    )


def _interleave(rows: Sequence[Example], key: Callable[[Example], Hashable]) -> list[Example]:
    """Round-robin over groups (in order of first appearance), each group in its own order."""
    groups: dict[Hashable, list[Example]] = {}
    for e in rows:
        groups.setdefault(key(e), []).append(e)
    out: list[Example] = []
    queues = list(groups.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def stratified_sample(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """``n`` rows drawn reproducibly, stratified by database and by Spider hardness.

    Allocation: each hardness level gets its proportional share of ``n`` and each database its
    proportional share with at least one row (when ``n`` >= the number of databases), both
    rounded by largest remainder; the (database, level) cells are then filled in proportion
    to the database's own level mix, keeping both totals (a cell never exceeds its rows). Rows
    within a cell are drawn by ``random.Random(f"{seed}:{db}:{level}")``, so the draw of one
    cell does not depend on any other. The sample keeps the input order. ``n`` None or >= the
    number of rows: every row.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise UserError(f"test_sample must be a positive integer, found {n}")
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        cells[(e.db_id or db_group_key(e), e.hardness or "")].append(i)
    db_sizes = Counter(e.db_id or db_group_key(e) for e in examples)
    level_sizes = Counter(e.hardness or "" for e in examples)
    want_db = _largest_remainder(db_sizes, n, minimum=1 if n >= len(db_sizes) else 0)
    want_level = _largest_remainder(level_sizes, n)
    exact = {(d, h): want_db[d] * len(idx) / db_sizes[d] for (d, h), idx in cells.items()}
    take = {c: min(math.floor(x), len(cells[c])) for c, x in exact.items()}

    def deficit_db(d: str) -> int:
        return want_db[d] - sum(v for (dd, _), v in take.items() if dd == d)

    def deficit_level(h: str) -> int:
        return want_level[h] - sum(v for (_, hh), v in take.items() if hh == h)

    while sum(take.values()) < n:
        open_cells = [c for c in cells if take[c] < len(cells[c]) and deficit_db(c[0]) > 0]
        both = [c for c in open_cells if deficit_level(c[1]) > 0]
        pick_from = both or open_cells or [c for c in cells if take[c] < len(cells[c])]
        best = min(pick_from, key=lambda c: (-(exact[c] - take[c]), c))
        take[best] += 1
    chosen: list[int] = []
    for (d, h), idx in sorted(cells.items()):
        rng = random.Random(f"{seed}:{d}:{h}")
        chosen.extend(rng.sample(idx, take[(d, h)]))
    return [examples[i] for i in sorted(chosen)]


def _largest_remainder(sizes: Counter[str], n: int, minimum: int = 0) -> dict[str, int]:
    """Integer shares of ``n`` proportional to ``sizes`` (Hamilton's method), each at least
    ``minimum`` (taken from the largest shares) and at most its size."""
    total = sum(sizes.values())
    exact = {k: n * v / total for k, v in sizes.items()}
    share = {k: min(math.floor(x), sizes[k]) for k, x in exact.items()}
    for k in sorted(sizes, key=lambda k: (-(exact[k] - share[k]), k)):
        if sum(share.values()) >= n:
            break
        if share[k] < sizes[k]:
            share[k] += 1
    for k in sorted(sizes):
        while share[k] < min(minimum, sizes[k]):
            donor = max(
                (d for d in sizes if share[d] > max(minimum, 1)),
                key=lambda d: (share[d] - exact[d], share[d], d),
            )
            share[donor] -= 1
            share[k] += 1
    return share


def assert_no_leakage(splits: Splits) -> None:
    """Raise if any normalized (question, schema) pair is in more than one split."""
    owner: dict[tuple[str, str], str] = {}
    for name, rows in splits.as_dict().items():
        for e in rows:
            k = pair_key(e)
            if k in owner and owner[k] != name:
                raise AssertionError(f"leak: {k[0]!r} in both {owner[k]} and {name}")
            owner[k] = name
