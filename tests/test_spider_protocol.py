"""Spider the way the field measures it: train on Spider train, test on Spider dev.

Real data from ``../shared/data/spider`` (6,904 train questions over 138 databases, 972 dev
questions over 19). Checked here: no dev database reaches training or validation (the
validation split is a few whole *train* databases); the test subset is drawn stratified by
database and Spider hardness, identical across runs and processes, covering all 19 dev
databases; the release archive's ``.json`` layout reads like our ``.jsonl`` copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dataset_utils.errors import UserError
from dataset_utils.hardness import spider_hardness
from dataset_utils.pipeline import prepare_data
from dataset_utils.records import Example
from dataset_utils.sources import SourceSpec, load_source
from dataset_utils.subsets import assign_splits, select_subset, stratified_sample
from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
# Spider dev's per-level counts (official rules, tests/test_hardness.py) and the counts the
# 240-question subset of the main job draws from them (240 * level / 972, rounded).
DEV_HARDNESS = {"easy": 232, "medium": 416, "hard": 160, "extra": 164}
SUBSET_240 = {"easy": 57, "medium": 103, "hard": 40, "extra": 40}
# The 5 train databases split.seed 123 holds out for validation at valid: 0.03.
VALID_DBS = {
    "e_learning": 82,
    "election_representative": 20,
    "local_govt_and_lot": 17,
    "scientist_1": 48,
    "student_1": 68,
}
MAIN_SPLIT = {"train": 0.97, "valid": 0.03, "test": 0.0, "seed": 123, "group_by": "db"}


@pytest.fixture(scope="module")
def spider(spider_full_dir: Path) -> dict[str, list[Example]]:
    return {
        split: load_source(
            SourceSpec(format="spider", path=str(spider_full_dir), split=split)
        ).examples
        for split in ("train", "dev")
    }


@pytest.fixture(scope="module")
def dev(spider: dict[str, list[Example]]) -> list[Example]:
    return [dataclasses.replace(e, hardness=spider_hardness(e.sql)) for e in spider["dev"]]


def test_no_dev_database_in_train_or_valid(spider: dict[str, list[Example]]) -> None:
    assert len(spider["train"]) == 6904 and len({e.db_id for e in spider["train"]}) == 138
    splits = assign_splits(spider["train"], {"test": spider["dev"]}, **MAIN_SPLIT)
    dbs = {name: {e.db_id for e in rows} for name, rows in splits.as_dict().items()}
    assert len(dbs["test"]) == 19 and len(splits.test) == 972
    assert not dbs["test"] & dbs["train"] and not dbs["test"] & dbs["valid"]
    # Validation is cross-database too: whole train databases, none of them trained on.
    assert Counter(e.db_id for e in splits.valid) == VALID_DBS
    assert not dbs["valid"] & dbs["train"]
    # 10 repeated (question, schema) pairs in Spider train are kept once.
    assert splits.stats["duplicates_removed"] == 10 and splits.stats["dropped_overlap"] == 0
    assert len(splits.train) + len(splits.valid) == 6904 - 10
    # Interleaved by database: the first 16 (the in-training generation subset) span all 5.
    assert {e.db_id for e in splits.valid[:5]} == set(VALID_DBS)


def test_test_subset_is_stratified_and_reproducible(dev: list[Example]) -> None:
    assert Counter(e.hardness for e in dev) == DEV_HARDNESS
    subset = stratified_sample(dev, 240, seed=0)
    assert subset == stratified_sample(dev, 240, seed=0)
    assert len(subset) == 240 and len({e.db_id for e in subset}) == 19
    assert Counter(e.hardness for e in subset) == SUBSET_240
    # Databases in proportion too (within one question; every one at least once).
    per_db, db_sizes = Counter(e.db_id for e in subset), Counter(e.db_id for e in dev)
    for db, size in db_sizes.items():
        assert abs(per_db[db] - 240 * size / 972) < 1 or per_db[db] == 1, db
    # Input order kept (questions on one database stay together for prefix sharing).
    positions = [dev.index(e) for e in subset]
    assert positions == sorted(positions)
    # Another seed draws other questions from the same cells.
    other = stratified_sample(dev, 240, seed=1)
    assert other != subset
    cells = Counter((e.db_id, e.hardness) for e in subset)
    assert Counter((e.db_id, e.hardness) for e in other) == cells
    # Any size: levels within one question of proportional, all 19 databases from n >= 19.
    for n in (19, 50, 100, 200, 500, 971):
        drawn = stratified_sample(dev, n, seed=0)
        levels = Counter(e.hardness for e in drawn)
        assert len(drawn) == n and len({e.db_id for e in drawn}) == 19
        for level, size in DEV_HARDNESS.items():
            assert abs(levels[level] - n * size / 972) < 1, (n, level)
    assert stratified_sample(dev, None) == dev and stratified_sample(dev, 972) == dev


def test_test_subset_is_the_same_in_another_process(dev: list[Example], tmp_path: Path) -> None:
    """No dependence on hash randomization or process state."""
    script = (
        "import dataclasses, json\n"
        "from dataset_utils.hardness import spider_hardness\n"
        "from dataset_utils.sources import SourceSpec, load_source\n"
        "from dataset_utils.subsets import stratified_sample\n"
        f"rows = load_source(SourceSpec(format='spider', path={str(dev[0].db_path)!r}"
        ".split('/database/')[0], split='dev')).examples\n"
        "rows = [dataclasses.replace(e, hardness=spider_hardness(e.sql)) for e in rows]\n"
        "print(json.dumps([e.question for e in stratified_sample(rows, 240, seed=0)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == [e.question for e in stratified_sample(dev, 240, seed=0)]


def test_number_of_samples_never_cuts_test_rows(spider: dict[str, list[Example]]) -> None:
    rows = spider["train"][:300] + spider["dev"]
    counted = [True] * 300 + [False] * len(spider["dev"])
    kept = select_subset(rows, "all", 100, None, counted)
    assert len(kept) == 100 + 972
    assert [e.question for e in kept[100:]] == [e.question for e in spider["dev"]]


def test_prepare_data_with_the_spider_protocol(
    spider_full_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tiny.tokenizer()  # from the model cache, before the dataset cache moves
    monkeypatch.setenv("TEXT2SQL_CACHE", str(tmp_path / "cache"))
    kwargs: dict[str, Any] = {
        "sources": [
            # The first 600 train questions (12 databases) keep the test fast.
            SourceSpec(
                format="spider",
                path=str(spider_full_dir),
                split="train",
                limit=600,
                schema_style="columns",
            ),
            SourceSpec(
                format="spider",
                path=str(spider_full_dir),
                split="dev",
                use="test",
                schema_style="columns",
            ),
        ],
        "tokenizer": tok,
        "chat_format": "chatml",
        "split": {**MAIN_SPLIT, "valid": 0.2, "train": 0.8},
        "max_length": 1024,
        "test_sample": 240,
    }
    data = prepare_data(**kwargs)
    r = data.report
    assert r["n_test"] == 240 and r["test_rows_before_sample"] == 972
    assert r["databases"]["test"] == 19 and r["test_databases_in_training"] == 0
    assert r["test_hardness"] == SUBSET_240
    assert all(e.hardness for e in data.examples["test"] + data.examples["valid"])
    assert all(e.hardness is None for e in data.examples["train"])  # not needed, not parsed
    assert r["valid_databases"] and not set(r["valid_databases"]) & {
        e.db_id for e in data.examples["train"]
    }
    assert list(r["source_use"].values()) == ["split", "test"]
    # The same test rows without the cache, and from it.
    again = prepare_data(**kwargs, use_cache=False)
    assert again.examples["test"] == data.examples["test"]
    assert prepare_data(**kwargs).report["cache"] == "hit"
    # Unlimited: the whole of dev.
    full = prepare_data(**{**kwargs, "test_sample": None})
    assert full.report["n_test"] == 972 and full.report["test_hardness"] == DEV_HARDNESS


def test_release_layout_json_reads_like_jsonl(spider_full_dir: Path, tmp_path: Path) -> None:
    """Spider's own archive: ``train_spider.json`` etc. (JSON arrays with more keys)."""
    release = tmp_path / "spider_data"
    release.mkdir()
    (release / "database").symlink_to(spider_full_dir / "database")
    (release / "tables.json").write_text("[]")
    rows = {}
    for name, split in (("train_spider", "train"), ("dev", "dev")):
        lines = (spider_full_dir / f"{name}.jsonl").read_text().splitlines()[:40]
        rows[split] = [json.loads(line) for line in lines]
        full = [{**r, "query_toks": r["query"].split(), "sql": {"select": []}} for r in rows[split]]
        (release / f"{name}.json").write_text(json.dumps(full, indent=2))
    (release / "train_others.json").write_text(json.dumps(rows["train"][:5]))
    for split in ("train", "dev"):
        from_json = load_source(SourceSpec(format="spider", path=str(release), split=split))
        from_jsonl = load_source(
            SourceSpec(format="spider", path=str(spider_full_dir), split=split, limit=40)
        )
        assert [dataclasses.replace(e, db_path=None) for e in from_json.examples] == [
            dataclasses.replace(e, db_path=None) for e in from_jsonl.examples
        ]
        assert [Path(e.db_path or "").resolve() for e in from_json.examples] == [
            Path(e.db_path or "").resolve() for e in from_jsonl.examples
        ]
        assert from_json.origin.endswith(".json")
    others = load_source(SourceSpec(format="spider", path=str(release), split="train_others"))
    assert len(others.examples) == 5


def test_config_checks_the_protocol_keys() -> None:
    from trainer.config import DataArgs, Hyperparameters, from_dict

    with pytest.raises(UserError, match=r"use: unknown 'eval'; expected one of split, train"):
        from_dict(Hyperparameters, {"data": {"sources": [{"format": "spider", "use": "eval"}]}})
    with pytest.raises(UserError, match="no training data"):
        from_dict(DataArgs, {"sources": [{"format": "spider", "split": "dev", "use": "test"}]})
    with pytest.raises(UserError, match="test_sample must be positive"):
        from_dict(DataArgs, {"test_sample": 0})
    hp = from_dict(DataArgs, {"split": {"group_by": "db"}, "test_sample": 240})
    assert hp.split.group_by == "db" and hp.test_sample == 240
