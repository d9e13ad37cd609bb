"""`dataset_utils.inspect`: subset sizes, token-length histogram, drop counts, rendered rows.

Runs on the hand-written Clinton / gretel / custom fixtures with the real SmolLM2 tokenizer,
and once through the command-line entry points (`add_inspect_arguments` +
`trainer.cli_model.run_inspect`) on the repository's CPU experiment with its sources overridden
to the fixtures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dataset_utils.errors import UserError
from dataset_utils.formatting import plan_format, tokenize_examples
from dataset_utils.inspect import (
    BUCKET_NAMES,
    DEFAULT_CANDIDATES,
    add_inspect_arguments,
    inspect_data,
)
from dataset_utils.sources import SourceSpec, load_source
from dataset_utils.subsets import select_subset
from trainer.cli_model import run_inspect

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
EXPERIMENT = REPO_ROOT / "experiments" / "smollm2-135m-lora-cpu.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SOURCES = [
    SourceSpec(format="clinton", path=str(FIXTURES / "clinton_sample.jsonl")),
    SourceSpec(format="gretel", path=str(FIXTURES / "gretel_sample.parquet")),
    SourceSpec(
        format="custom",
        path=str(FIXTURES / "custom_sample.csv"),
        columns={"question": "nl_question", "context": "schema_ddl", "sql": "gold_sql"},
    ),
]


@pytest.fixture(scope="session")
def smollm2() -> Any:
    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    return load_tokenizer(ModelArgs(name_or_path="embedded:smollm2-135m-instruct"))


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_inspect_counts_are_consistent(tmp_path: Path, smollm2: Any) -> None:
    out = tmp_path / "out"
    report = inspect_data(
        SOURCES,
        smollm2,
        chat_format="chatml",
        max_length=160,
        candidate_lengths=[100, 200, 1000],
        n_examples=4,
        out_dir=out,
    )
    # Per-source bucket counts add up to the rows of each source.
    assert [(s.format, s.rows) for s in report.sources] == [
        ("clinton", 12),
        ("gretel", 12),
        ("custom", 6),
    ]
    for s in report.sources:
        assert set(s.buckets) == set(BUCKET_NAMES)
        assert sum(s.buckets.values()) == s.rows
    clinton, gretel, _ = report.sources
    assert clinton.buckets == {"easy": 11, "medium": 1, "hard": 0, "unbucketed": 0}
    assert gretel.complexity["window functions"] == 2 and sum(gretel.complexity.values()) == 12
    assert clinton.complexity == {}

    # One token length per kept row, equal to what training would build.
    rows = select_subset([e for s in SOURCES for e in load_source(s).examples], "all")
    tok = tokenize_examples(rows, smollm2, plan_format("chatml", smollm2), None)
    assert report.rows_in_subset == len(rows) == 30
    assert report.lengths == [len(x) for x in tok.input_ids]
    # Drop counts: for the experiment's max_length and every candidate, equal to what the
    # length policy really drops, and never increasing with the length.
    assert sorted(report.drops) == [100, 160, 200, 1000]
    for length, dropped in report.drops.items():
        real = tokenize_examples(rows, smollm2, plan_format("chatml", smollm2), length)
        assert dropped == real.dropped_too_long
    values = [report.drops[k] for k in sorted(report.drops)]
    assert values == sorted(values, reverse=True)
    assert report.drops[100] > 0 and report.drops[1000] == 0

    # Files: a valid PNG, a JSON summary that matches the report, the rendered examples.
    width, height = _assert_png(out / "token_lengths.png")
    assert width >= 400 and height >= 300
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["rows_in_subset"] == 30
    assert summary["dropped_by_max_length"] == {
        "100": report.drops[100],
        "160": report.drops[160],
        "200": report.drops[200],
        "1000": 0,
    }
    assert summary["token_length"]["max"] == max(report.lengths)
    assert len(report.examples) == len(summary["examples"]) == 4
    text = (out / "examples.txt").read_text(encoding="utf-8")
    for e in report.examples:
        assert e.tokens == report.lengths[e.index]
        assert e.prompt.startswith("<|im_start|>system\n") and e.completion.endswith("<|im_end|>")
        assert e.prompt + e.completion in text
    assert sorted(p.name for p in out.iterdir()) == [
        "examples.txt",
        "summary.json",
        "token_lengths.png",
    ]


def test_inspect_text_report(tmp_path: Path, smollm2: Any) -> None:
    report = inspect_data(
        SOURCES[:1], smollm2, chat_format="plain", max_length=128, n_examples=2, out_dir=tmp_path
    )
    text = report.format_text()
    assert "clinton (clinton_sample.jsonl)" in text
    assert "<- experiment" in text
    assert text.count("--- prompt ---") == 2 and "### Response:" in text
    assert str(tmp_path / "token_lengths.png") in text


def test_inspect_subset_and_sampling(tmp_path: Path, smollm2: Any) -> None:
    report = inspect_data(
        SOURCES[:2], smollm2, chat_format="chatml", subset="medium", n_examples=5, out_dir=tmp_path
    )
    assert report.rows_in_subset == 1  # the one medium Clinton row
    assert len(report.examples) == 1 and report.examples[0].difficulty == "medium"
    report = inspect_data(
        SOURCES[1:2],
        smollm2,
        chat_format="chatml",
        complexity=["window functions"],
        n_examples=0,
        out_dir=tmp_path,
    )
    assert report.rows_in_subset == 2 and report.examples == []
    _assert_png(tmp_path / "token_lengths.png")


def test_inspect_bad_input(tmp_path: Path, smollm2: Any) -> None:
    with pytest.raises(UserError, match=r"--max-length values must be positive integers"):
        inspect_data(SOURCES, smollm2, candidate_lengths=[0, 128], out_dir=tmp_path)
    with pytest.raises(UserError, match=r"subset 'hard' is empty"):
        inspect_data(SOURCES, smollm2, subset="hard", out_dir=tmp_path)
    with pytest.raises(UserError, match="unknown chat format"):
        inspect_data(SOURCES, smollm2, chat_format="alpaca", out_dir=tmp_path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="text2sql data inspect")
    add_inspect_arguments(parser)
    return parser.parse_args(argv)


def test_arguments() -> None:
    ns = _parse(["exp.yaml"])
    assert (ns.experiment, ns.set, ns.out, ns.examples, ns.max_length) == (
        "exp.yaml",
        [],
        "data-inspect",
        3,
        None,
    )
    ns = _parse(
        [
            "exp.yaml",
            "--max-length",
            "256",
            "512",
            "--set",
            "data.subset=easy",
            "--max-length",
            "1024",
            "--examples",
            "1",
            "--out",
            "x",
        ]
    )
    assert ns.max_length == [256, 512, 1024]
    assert ns.set == ["data.subset=easy"] and ns.examples == 1 and ns.out == "x"


def test_run_inspect_on_an_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    sources = (
        "data.sources=[{format: gretel, path: "
        + str(FIXTURES / "gretel_sample.parquet")
        + "}, {format: clinton, path: "
        + str(FIXTURES / "clinton_sample.jsonl")
        + "}]"
    )
    ns = _parse(
        [
            str(EXPERIMENT),
            "--set",
            sources,
            "--set",
            "data.max_length=200",
            "--examples",
            "2",
            "--max-length",
            "128",
            "256",
        ]
    )
    assert run_inspect(ns) == 0
    printed = capsys.readouterr().out
    # Default output folder: ./data-inspect under the current directory, and nothing else.
    out = tmp_path / "data-inspect"
    assert [p.name for p in tmp_path.iterdir()] == ["data-inspect"]
    _assert_png(out / "token_lengths.png")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["chat_format"] == "chatml"  # from the experiment's model settings
    assert summary["max_length"] == 200
    assert set(summary["dropped_by_max_length"]) == {"128", "200", "256"}
    assert summary["rows_in_subset"] == 24
    assert "gretel (gretel_sample.parquet)" in printed
    assert "clinton (clinton_sample.jsonl)" in printed
    assert printed.count("--- completion ---") == 2
    assert "complexity labels: " in printed


def test_run_inspect_default_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = _parse(
        [
            str(EXPERIMENT),
            "--set",
            "data.sources=[{format: clinton, path: "
            + str(FIXTURES / "clinton_sample.jsonl")
            + "}]",
            "--examples",
            "0",
            "--out",
            "report",
        ]
    )
    assert run_inspect(ns) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
    assert sorted(map(int, summary["dropped_by_max_length"])) == sorted({*DEFAULT_CANDIDATES, 768})


def test_run_inspect_missing_experiment(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        run_inspect(_parse([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()


def test_inspect_shows_the_sql_the_trainer_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spider_dir: Path
) -> None:
    """`data inspect` on the main job's config draws its rendered examples from the training
    split the trainer builds (`build_datasets`, as `trainer.job.train` calls it): the same
    prompt and completion, so the SQL is in the job's `sql_style: dealiased` (no T1/T2)."""
    import re

    from dataset_utils.formatting import render_completion, render_prompt
    from trainer.experiment import load_experiment
    from trainer.modeling import load_tokenizer
    from trainer.training_data import build_datasets

    monkeypatch.chdir(tmp_path)
    sets = ["data.number_of_samples=300"]  # the main job's data, fewer training rows
    ns = _parse([str(EXPERIMENT), "--set", sets[0], "--examples", "12", "--out", "o"])
    assert run_inspect(ns) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text(encoding="utf-8"))
    assert summary["sql_style"] == "dealiased"

    exp = load_experiment(EXPERIMENT, sets)
    tokenizer = load_tokenizer(exp.hparams.model)
    prepared = build_datasets(exp.hparams, tokenizer)
    assert prepared.report["sql_rewritten"] > 0
    train = prepared.examples["train"]
    shown = summary["examples"]
    assert len(shown) == 12
    for e in shown:
        assert e["split"] == "train"
        row = train[e["index"]]
        assert e["completion"] == render_completion(row, prepared.plan)
        assert e["prompt"] == render_prompt(row, tokenizer, prepared.plan)
    aliased = [e["completion"] for e in shown if re.search(r"\bT\d\.", e["completion"])]
    assert not aliased, aliased
