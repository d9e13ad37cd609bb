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
was trained on under a different wording.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dataset_utils.errors import UserError
from dataset_utils.records import Example

DIFFICULTY_BUCKETS: dict[str, tuple[int, int]] = {
    "easy": (10, 100),
    "medium": (101, 200),
    "hard": (201, 800),
}
SUBSETS = (*DIFFICULTY_BUCKETS, "all")
GROUP_BY = ("none", "sql")

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


def select_subset(
    examples: Sequence[Example],
    subset: str = "all",
    number_of_samples: int | None = None,
    complexity: Sequence[str] | None = None,
) -> list[Example]:
    """Filter by difficulty bucket (and/or the dataset's own complexity labels), then keep the
    first ``number_of_samples`` rows, as the recipe does."""
    if subset not in SUBSETS:
        raise UserError(
            f"unknown difficulty subset {subset!r}; expected one of {', '.join(SUBSETS)}"
        )
    rows = with_difficulty(examples)
    if subset != "all":
        rows = [e for e in rows if e.difficulty == subset]
    if complexity:
        # Labels of every input row, not only of the difficulty bucket: an empty bucket must
        # be reported as empty, not as "these rows carry no complexity labels".
        labels = {e.complexity for e in examples if e.complexity}
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
        rows = [e for e in rows if e.complexity in set(complexity)]
    if number_of_samples is not None:
        if number_of_samples <= 0:
            raise UserError(f"number_of_samples must be positive, found {number_of_samples}")
        rows = rows[:number_of_samples]
    if not rows:
        what = f"subset {subset!r}" + (f" with complexity {list(complexity)}" if complexity else "")
        raise UserError(
            f"{what} is empty after filtering {len(examples)} rows "
            f"(word-count buckets: {DIFFICULTY_BUCKETS})"
        )
    return rows


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
        key: object = sql_group_key(e) if group_by == "sql" else i
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


def assert_no_leakage(splits: Splits) -> None:
    """Raise if any normalized (question, schema) pair is in more than one split."""
    owner: dict[tuple[str, str], str] = {}
    for name, rows in splits.as_dict().items():
        for e in rows:
            k = pair_key(e)
            if k in owner and owner[k] != name:
                raise AssertionError(f"leak: {k[0]!r} in both {owner[k]} and {name}")
            owner[k] = name
