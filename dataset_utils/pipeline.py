"""From source specs to tokenized train/valid splits and held-out test examples, cached.

``prepare_data`` = load every source -> difficulty subset -> de-duplicate + split (no leakage;
sources with ``use: train|valid|test`` go wholly to that split) -> Spider hardness of the
validation and test rows -> optional stratified test sample -> tokenize with completion-only
labels (dropping, and counting, rows over ``max_length``).

The result is cached under ``cache_dir("datasets", <key>)``, where the key hashes the source
fingerprints (file contents / Hub fingerprints, and each source's whole spec: split, use,
limit, schema style...) and *every* parameter that changes the output: subset, number of
samples, complexity labels, split fractions, seed and grouping, SQL style, test sample size
and seed, max length, chat format, the prompt templates, and the tokenizer itself (its
vocabulary size, chat template and the ids it gives a probe string). A changed parameter
therefore never reuses a stale cache. Writes are atomic (temp dir + rename), so a killed run
never leaves half a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils import formatting
from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan, plan_format, tokenize_examples
from dataset_utils.hardness import HARDNESS_VERSION, spider_hardness
from dataset_utils.records import Example
from dataset_utils.settings import cache_dir
from dataset_utils.sources import LoadedSource, SourceSpec, load_source
from dataset_utils.sql_style import apply_sql_style
from dataset_utils.subsets import (
    Splits,
    assign_splits,
    select_subset_indices,
    stratified_sample,
)

log = logging.getLogger(__name__)
PIPELINE_VERSION = "6"
_PROBE = 'SELECT name FROM singer WHERE age > 30 -- Schema:\nCREATE TABLE "t" (a INT)'


@dataclass
class PreparedData:
    """Tokenized splits plus the examples behind them and a report of every count."""

    plan: FormatPlan
    train: Any  # datasets.Dataset with input_ids, attention_mask, labels, length
    valid: Any
    examples: dict[str, list[Example]]  # train / valid / test, after the length policy
    report: dict[str, Any] = field(default_factory=dict)
    cache_path: Path | None = None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(len(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    h.update(json.dumps(tokenizer(_PROBE, add_special_tokens=True)["input_ids"]).encode())
    for attr in ("eos_token", "bos_token", "pad_token"):
        h.update(str(getattr(tokenizer, attr, None)).encode())
    return h.hexdigest()[:16]


def cache_key(loaded: Sequence[LoadedSource], tokenizer: Any, params: dict[str, Any]) -> str:
    payload = {
        "version": PIPELINE_VERSION,
        "sources": [s.fingerprint for s in loaded],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "templates": [formatting.SYSTEM_PROMPT, formatting.PLAIN_TEMPLATE],
        "hardness": HARDNESS_VERSION,
        **params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :20
    ]


def _to_dataset(columns: dict[str, list[Any]]) -> Any:
    import datasets

    columns = dict(columns)
    columns["length"] = [len(x) for x in columns["input_ids"]]
    return datasets.Dataset.from_dict(columns)


def _write_jsonl(path: Path, rows: Sequence[Example]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for e in rows:
            fh.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as fh:
        return [Example.from_dict(json.loads(line)) for line in fh if line.strip()]


def _with_hardness(e: Example) -> Example:
    return dataclasses.replace(e, hardness=spider_hardness(e.sql))


def _count_by(rows: Sequence[Example], attr: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in rows:
        key = str(getattr(e, attr))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def prepare_data(
    *,
    sources: Sequence[SourceSpec],
    tokenizer: Any,
    chat_format: str = "auto",
    subset: str = "all",
    number_of_samples: int | None = None,
    complexity: Sequence[str] | None = None,
    split: dict[str, Any] | None = None,
    max_length: int = 1024,
    sql_style: str = "original",
    test_sample: int | None = None,
    test_sample_seed: int = 0,
    data_dir: Path | None = None,
    use_cache: bool = True,
) -> PreparedData:
    """Load, subset, split and tokenize (see the module docstring).

    ``test_sample``: keep this many test rows, stratified by database and Spider hardness
    (`dataset_utils.subsets.stratified_sample`, seeded by ``test_sample_seed``); None: all.
    """
    split = dict(split or {})
    plan = plan_format(chat_format, tokenizer)
    loaded = [load_source(s, data_dir) for s in sources]
    params = {
        "subset": subset,
        "number_of_samples": number_of_samples,
        "complexity": list(complexity or []),
        "split": split,
        "max_length": max_length,
        "plan": plan.__dict__,
    }
    if sql_style != "original":
        params["sql_style"] = sql_style
    if test_sample is not None:
        params["test_sample"] = [test_sample, test_sample_seed]
    key = cache_key(loaded, tokenizer, params)
    path = cache_dir("datasets") / key
    if use_cache and (path / "report.json").is_file():
        import datasets

        report = json.loads((path / "report.json").read_text())
        report["cache"] = "hit"
        log.info("dataset cache hit: %s", path)
        return PreparedData(
            plan=plan,
            train=datasets.load_from_disk(str(path / "train")),
            valid=datasets.load_from_disk(str(path / "valid")),
            examples={s: _read_jsonl(path / f"{s}.jsonl") for s in ("train", "valid", "test")},
            report=report,
            cache_path=path,
        )

    rows: list[Example] = [e for s in loaded for e in s.examples]
    uses = [s.spec.use for s in loaded for _ in s.examples]
    # number_of_samples cuts the data the recipe trains on, never rows given to valid / test.
    subset_rows, kept = select_subset_indices(
        rows, subset, number_of_samples, complexity, [u in ("split", "train") for u in uses]
    )
    by_use: dict[str, list[Example]] = {"split": [], "train": [], "valid": [], "test": []}
    for e, i in zip(subset_rows, kept, strict=True):
        by_use[uses[i]].append(e)
    pool = by_use.pop("split")
    splits: Splits = assign_splits(pool, by_use, **split)
    # Hardness of every row that is scored (1-2 ms of parsing per query: not the train rows).
    for name in ("valid", "test"):
        setattr(splits, name, [_with_hardness(e) for e in getattr(splits, name)])
    test_in_split = len(splits.test)
    splits.test = stratified_sample(splits.test, test_sample, test_sample_seed)
    # After the split (grouped by the original SQL), so the style cannot move a row across it.
    rewritten = 0
    for name in ("train", "valid", "test"):
        styled, n = apply_sql_style(getattr(splits, name), sql_style)
        setattr(splits, name, styled)
        rewritten += n
    databases = {
        name: sorted({e.db_id for e in getattr(splits, name) if e.db_id})
        for name in ("train", "valid", "test")
    }
    report: dict[str, Any] = {
        "sources": {s.origin: len(s.examples) for s in loaded},
        "source_use": {s.origin: s.spec.use for s in loaded},
        "rows_loaded": len(rows),
        "rows_in_subset": len(subset_rows),
        "subset": subset,
        "duplicates_removed": splits.duplicates_removed,
        "dropped_overlap": splits.stats.get("dropped_overlap", 0),
        "databases": {name: len(dbs) for name, dbs in databases.items()},
        "valid_databases": databases["valid"],
        # Spider's protocol: 0 (no test database is seen in training or validation).
        "test_databases_in_training": len(
            set(databases["test"]) & (set(databases["train"]) | set(databases["valid"]))
        ),
        "test_rows_before_sample": test_in_split,
        "test_sample": test_sample,
        "test_sample_seed": test_sample_seed,
        "test_hardness": _count_by(splits.test, "hardness"),
        "sql_style": sql_style,
        "sql_rewritten": rewritten,
        "chat_format": plan.chat_format,
        "max_length": max_length,
        "cache": "miss",
        "cache_key": key,
    }
    tokenized: dict[str, Any] = {}
    examples: dict[str, list[Example]] = {}
    for name, split_rows in splits.as_dict().items():
        # The held-out test split is never shrunk by the training length policy (that would
        # make the test easier); over-long test rows are only counted.
        tok = tokenize_examples(split_rows, tokenizer, plan, None if name == "test" else max_length)
        if name == "test":
            report["test_longer_than_max_length"] = sum(
                1 for ids in tok.input_ids if len(ids) > max_length
            )
        examples[name] = [split_rows[i] for i in tok.kept]
        report[f"n_{name}"] = len(tok.kept)
        report[f"dropped_too_long_{name}"] = tok.dropped_too_long
        if name != "test":
            tokenized[name] = _to_dataset(tok.as_columns())
        if tok.dropped_too_long:
            log.warning(
                "%s: dropped %d of %d examples longer than max_length=%d tokens (answers are "
                "never truncated)",
                name,
                tok.dropped_too_long,
                len(split_rows),
                max_length,
            )
    if report["n_train"] == 0:
        raise UserError(
            f"no training examples left: all {len(splits.train)} are longer than "
            f"max_length={max_length} tokens"
        )
    if use_cache:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
        try:
            for name in ("train", "valid"):
                tokenized[name].save_to_disk(str(tmp / name))
            for name, rows_ in examples.items():
                _write_jsonl(tmp / f"{name}.jsonl", rows_)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(
        plan=plan,
        train=tokenized["train"],
        valid=tokenized["valid"],
        examples=examples,
        report=report,
        cache_path=path if use_cache else None,
    )
