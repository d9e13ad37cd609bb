"""Taking a trained model somewhere: ask, serve (pyfunc), export, evaluate on new data.

One tiny LoRA model is trained for the module on a Spider release in the official layout
(`tests.spider_archive`: three train databases, a dev database no training row uses), so
nothing here needs ``../shared``. What is real: the Trainer, peft, the SQLite sandbox, MLflow's
pyfunc save/load with signature enforcement, the ``text2sql`` CLI, and a fresh Python process
that loads the exported folder with plain ``transformers`` after the base model and every
cache are gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dataset_utils.errors import UserError
from tests import tiny
from tests.conftest import REPO_ROOT
from tests.spider_archive import Archive, build_archive

MAX_NEW_TOKENS = 24
STEPS = 12


@dataclass
class Trained:
    root: Path
    spider: Path  # the unpacked release: train_spider.json, dev.json, database/
    archive: Archive
    model_dir: Path
    trial: Path
    checkpoint: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    root = tmp_path_factory.mktemp("model-tools")
    archive = build_archive(root / "official")
    spider = root / "spider"
    with zipfile.ZipFile(archive.path) as zf:
        for info in zf.infolist():
            if info.filename.startswith("spider_data/") and not info.is_dir():
                dest = spider / info.filename[len("spider_data/") :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
    model_dir = tiny.make_tiny_model(root / "tiny-llama")
    exp = tiny.write_experiment(root / "exp.yaml", model_dir, name="tools", steps=STEPS, lr=3e-2)
    from trainer.experiment import load_experiment
    from trainer.local_runner import launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        overrides = [
            f"data.sources=[{{format: spider, path: {spider}, split: train, "
            "schema_style: columns}]",
            f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        ]
        result = launch(load_experiment(exp, overrides), root / "runs", progress=False)
    trial = result.trial
    ckpt = trial.checkpoint_path(trial.checkpoints()[-1]["uuid"])
    yield Trained(root, spider, archive, model_dir, trial.path, ckpt)


@pytest.fixture(scope="module")
def loaded(trained: Trained) -> Any:
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(trained.checkpoint)


def _db(trained: Trained, db_id: str) -> Path:
    return trained.spider / "database" / db_id / f"{db_id}.sqlite"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prompts(loaded: Any, n: int) -> list[Any]:
    """``n`` examples from the checkpoint's own splits (test, then valid, then train)."""
    from evaluation.checkpoint_eval import test_examples

    out: list[Any] = []
    for split in ("test", "valid", "train"):
        out += test_examples(loaded, n, split=split)
    assert len(out) >= n
    return out[:n]


# ------------------------------------------------------------------------------------------
# Databases: read-only, sandboxed, time-limited


def test_databases_are_opened_read_only(trained: Trained) -> None:
    from evaluation.databases import open_database

    path = _db(trained, "concert_hall")
    before = _sha(path)
    for ref in (str(path), f"sqlite:///{path}"):
        db = open_database(ref)
        res = db.run("SELECT count(*), max(age) FROM singer", max_rows=5)
        assert res.ok and res.columns == ["count(*)", "max(age)"] and res.rows == [(12, 56)]
        assert db.schema("columns").splitlines()[0] == (
            "CREATE TABLE singer (singer_id, name, country, age)"
        )
        for bad in (
            "DELETE FROM singer",
            "SELECT 1; DROP TABLE singer",
            "PRAGMA writable_schema=1",
        ):
            assert not db.run(bad).ok, bad
        slow = db.run(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT count(*) FROM c",
            timeout_s=0.3,
        )
        assert slow.timed_out and slow.error == "timed out after 0.3s"
        capped = db.run("SELECT name FROM singer ORDER BY singer_id", max_rows=3)
        assert capped.rows == [("Singer 1",), ("Singer 2",), ("Singer 3",)] and capped.truncated
    assert _sha(path) == before

    for ref, message in (
        (str(trained.root / "nope.sqlite"), "does not exist"),
        (str(trained.spider / "dev.json"), "not a SQLite database"),
        ("oracle://scott:tiger@127.0.0.1/orcl", "cannot open oracle read-only"),
        ("postgresql://u:secret@127.0.0.1:1/db", "Install the database driver"),
        ("sqlite://", "names no SQLite file"),
    ):
        with pytest.raises(UserError, match=message) as err:
            open_database(ref)
        assert "secret" not in str(err.value)


# ------------------------------------------------------------------------------------------
# The answerer (shared by ask and serving) and the pyfunc model


def test_answer_from_schema_or_db_is_the_same_sql_and_rows_come_from_the_sandbox(
    trained: Trained, loaded: Any
) -> None:
    from dataset_utils.schema import schema_from_sqlite
    from evaluation.answer import from_checkpoint
    from evaluation.sandbox import run_readonly

    answerer = from_checkpoint(loaded)
    assert answerer.schema_style == "columns"  # what the checkpoint trained on
    questions = [r["question"] for r in trained.archive.train][:6]
    dbs = [str(_db(trained, r["db_id"])) for r in trained.archive.train][:6]
    schemas = [schema_from_sqlite(d, "columns") for d in dbs]
    by_schema = answerer.answer(questions, schemas=schemas)
    by_db = answerer.answer(questions, dbs=dbs, execute=True, max_rows=3)
    assert [a.sql for a in by_schema] == [a.sql for a in by_db]
    assert all(a.rows is None for a in by_schema)
    ran = 0
    for a, db in zip(by_db, dbs, strict=True):
        res = run_readonly(db, a.sql, timeout_s=5.0, max_rows=3)
        assert a.error == (None if res.ok else res.error)
        assert a.rows == [list(r) for r in res.rows] and a.columns == res.columns
        ran += res.ok
    print(f"{ran}/6 generated queries ran")
    with pytest.raises(UserError, match="give a schema"):
        answerer.answer(["How many?"])


def test_pyfunc_model_serves_schema_context_and_db_requests(
    trained: Trained, loaded: Any, tmp_path: Path
) -> None:
    import mlflow
    import pandas as pd

    from cluster.mlflow_model import (
        Text2SqlModel,
        build_model_dir,
        code_paths,
        pip_requirements,
        signature,
    )
    from evaluation.answer import from_checkpoint

    artifacts = build_model_dir(loaded, tmp_path / "staging")
    mlflow.pyfunc.save_model(
        str(tmp_path / "pyfunc"),
        python_model=Text2SqlModel(),
        artifacts=artifacts,
        code_paths=code_paths(),
        signature=signature(),
        pip_requirements=pip_requirements(),
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    sig = model.metadata.signature
    assert [(c.name, c.required) for c in sig.inputs.inputs] == [
        ("question", True),
        ("schema", False),
        ("context", False),
        ("db", False),
    ]
    assert {p.name for p in sig.params.params} >= {"execute", "max_rows", "max_new_tokens"}

    db = str(_db(trained, "pet_clinic"))
    question = "How many cats are there?"
    expected = from_checkpoint(loaded).answer([question], dbs=[db], execute=True, max_rows=2)[0]
    schema = "CREATE TABLE pet (pet_id, pet_type, weight, owner_id)"
    # schema-only request (only the fields sent; the optional ones are simply absent)
    out = model.predict(pd.DataFrame([{"question": question, "schema": schema}]))
    assert list(out.columns) == ["sql"]
    alias = model.predict(pd.DataFrame([{"question": question, "context": schema}]))
    assert alias["sql"][0] == out["sql"][0]
    # db request, executed
    got = model.predict(
        pd.DataFrame([{"question": question, "db": db}]), params={"execute": True, "max_rows": 2}
    )
    assert list(got.columns) == ["sql", "columns", "rows", "error"]
    row = got.iloc[0]
    assert row["sql"] == expected.sql and row["error"] == expected.error
    assert list(row["rows"]) == expected.rows and list(row["columns"]) == expected.columns
    # db request without execute: the db only supplies the schema
    plain = model.predict(pd.DataFrame([{"question": question, "db": db}]))
    assert list(plain.columns) == ["sql"] and plain["sql"][0] == expected.sql
    with pytest.raises(Exception, match="give a schema"):
        model.predict(pd.DataFrame([{"question": question}]))


# ------------------------------------------------------------------------------------------
# text2sql ask


def _error(err: str) -> str:
    """The one ``error:`` line a failed command printed (progress bars aside), no traceback."""
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from trainer.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_ask_prints_the_sql_and_the_rows(
    trained: Trained,
    loaded: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from evaluation.answer import from_checkpoint
    from trainer.cli_model import format_rows

    db = str(_db(trained, "book_shop"))
    before = _sha(Path(db))
    answerer = from_checkpoint(loaded)
    questions = [
        "How many books cost more than 12?",
        "List the titles of books published after 2000.",
    ]
    expected = answerer.answer(questions, dbs=[db, db], execute=True, max_rows=10)

    def block(a: Any) -> str:
        lines = [f"SQL: {a.sql or '(empty)'}"]
        if a.error:
            lines.append(f"error: the query did not run: {a.error}")
        else:
            lines.append(format_rows(a.columns, a.rows, truncated=a.truncated))
        return "\n".join(lines) + "\n"

    rc, out, err = _cli(
        ["ask", "--model", str(trained.checkpoint), "--db", db, questions[0]], capsys
    )
    assert rc == 0, err
    assert out == block(expected[0])

    # interactive: one question per line on stdin, an empty line ends
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{questions[0]}\n{questions[1]}\n\n"))
    rc, out, err = _cli(["ask", "--model", str(trained.trial), "--db", db], capsys)
    assert rc == 0, err
    body = out.split("\n", 1)[1].replace("question> ", "")
    assert body == block(expected[0]) + block(expected[1])

    rc, out, _ = _cli(
        ["ask", "--model", str(trained.checkpoint), "--db", db, "--schema-only", questions[0]],
        capsys,
    )
    assert rc == 0 and out == f"SQL: {expected[0].sql or '(empty)'}\n"
    assert _sha(Path(db)) == before

    for args, message in (
        (["--db", str(trained.root / "missing.sqlite"), "q?"], "does not exist"),
        (["--db", db, "--max-rows", "0", "q?"], "--max-rows must be >= 1"),
    ):
        rc, out, err = _cli(["ask", "--model", str(trained.checkpoint), *args], capsys)
        assert rc == 2 and message in _error(err), err
    rc, _, err = _cli(
        ["ask", "--model", str(trained.root / "nothing-here"), "--db", db, "q?"], capsys
    )
    assert rc == 2 and "neither a checkpoint folder" in _error(err)


# ------------------------------------------------------------------------------------------
# text2sql export


_STANDALONE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts_file = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
out = []
for p in json.load(open(prompts_file)):
    msgs = [{"role": "user", "content": f"Schema:\n{p['schema']}\n\nQuestion: {p['question']}"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = model.generate(**ids)
    out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps({"standalone": out}))
import sys
from evaluation.answer import from_pretrained
from dataset_utils.records import Example
ans = from_pretrained(folder)
ans.batch_size = 1
ex = [Example(question=p["question"], context=p["schema"], sql="", source="x")
      for p in json.load(open(prompts_file))]
print(json.dumps({"engine": ans.generate(ex)}))
"""


def test_export_is_standalone_and_reproduces_greedy_sql(
    trained: Trained, loaded: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from evaluation.generation import generate_sql
    from evaluation.postprocess import extract_sql

    out = tmp_path / "exported"
    rc, stdout, err = _cli(
        ["export", "--checkpoint", str(trained.checkpoint), "--out", str(out)], capsys
    )
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "text2sql_model.json",
        "README.md",
    ):
        assert name in names, name
    assert "adapter_config.json" not in names
    for f in out.glob("*.json"):
        text = f.read_text()
        for local in (str(trained.root), str(Path.home() / ".cache"), str(trained.model_dir)):
            assert local not in text, (f.name, local)
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["do_sample"] is False and gen_cfg["max_new_tokens"] == MAX_NEW_TOKENS

    examples = _prompts(loaded, 20)
    expected = generate_sql(
        loaded.model,
        loaded.tokenizer,
        examples,
        loaded.plan,
        batch_size=1,
        max_new_tokens=MAX_NEW_TOKENS,
        progress=False,
    ).sql
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps([{"question": e.question, "schema": e.context} for e in examples])
    )
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    # A fresh process on the folder alone: the base model moved away, empty caches, offline.
    hidden = trained.model_dir.with_name("tiny-llama-hidden")
    trained.model_dir.rename(hidden)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TEXT2SQL_"))}
        env.update(
            HF_HOME=str(tmp_path / "hf-home"),
            TEXT2SQL_CACHE=str(tmp_path / "cache"),
            HF_HUB_OFFLINE="1",
            PYTHONPATH=str(REPO_ROOT),
        )
        r = subprocess.run(
            [sys.executable, str(script), str(out), str(prompts)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        hidden.rename(trained.model_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    standalone = [extract_sql(t) for t in lines[0]["standalone"]]
    engine = lines[1]["engine"]
    assert engine == expected  # the merged folder through our engine: 20/20
    assert standalone == expected  # plain transformers, chat template + generation_config: 20/20
    assert len(set(expected)) > 1 and any(expected)
    assert not (tmp_path / "cache" / "models").exists()  # nothing was converted or fetched


def test_export_arguments_are_checked_before_any_work(
    trained: Trained,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = ["--checkpoint", str(trained.checkpoint)]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["--out", str(busy)], "exists and is not empty"),
        (["--out", str(tmp_path / "a"), "--adapter"], "is a local folder"),
        (["--out", str(tmp_path / "b"), "--base-id", "org/model"], "only applies with --adapter"),
        (["--out", str(tmp_path / "c"), "--push-to-hub", "not a repo!"], "not a valid Hub repo id"),
        (["--out", str(tmp_path / "d"), "--push-to-hub", "someone/text2sql"], "HF_HUB_OFFLINE=1"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in cases:
        rc, _, err = _cli(["export", *ckpt, *args], capsys)
        assert rc == 2 and message in _error(err), (args, err)
    assert (busy / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]

    # --adapter with an explicit Hub base: the adapter and a portable base reference.
    out = tmp_path / "adapter"
    rc, _, err = _cli(
        ["export", *ckpt, "--out", str(out), "--adapter", "--base-id", "org/base"], capsys
    )
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base"
    assert (out / "adapter_model.safetensors").is_file() and not (
        out / "model.safetensors"
    ).exists()


# ------------------------------------------------------------------------------------------
# text2sql evaluate --data / --model


def test_evaluate_on_a_spider_folder_with_a_database_never_seen(
    trained: Trained,
    loaded: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./runs/mlflow.db here
    # Not logged anywhere: an MLflow client earlier in the session may have exported one.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from evaluation.answer import from_checkpoint
    from evaluation.checkpoint_eval import test_examples

    seen = {
        e.db_id for split in ("train", "valid", "test") for e in test_examples(loaded, 10**6, split)
    }
    assert "museum_visits" not in seen and seen <= {"concert_hall", "pet_clinic", "book_shop"}

    out = tmp_path / "report"
    rc, stdout, err = _cli(
        [
            "evaluate",
            "--checkpoint",
            str(trained.checkpoint),
            "--data",
            str(trained.spider),
            "--no-progress",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 0, err
    for name in ("report.json", "report.md", "exec_accuracy.png", "per_example.csv", "curves.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    rows = report["examples"]
    assert [(r["question"], r["gold"], r["db_id"]) for r in rows] == [
        (d["question"], d["query"], d["db_id"]) for d in trained.archive.dev
    ]
    assert set(report["models"]) == {"base", "fine-tuned"}
    # The SQL in the report is the model's greedy SQL for prompts built from the unseen DB.
    from dataset_utils.records import Example
    from dataset_utils.schema import schema_from_sqlite

    db = str(_db(trained, "museum_visits"))
    schema = schema_from_sqlite(str(Path(db).resolve()), "columns")
    answerer = from_checkpoint(loaded)
    again = answerer.generate(
        [Example(question=r["question"], context=schema, sql="", source="x") for r in rows]
    )
    assert [r["fine-tuned_sql"] for r in rows] == again
    assert "examples" in stdout and f"report: {out / 'report.md'}" in stdout

    # A CSV of questions with one SQLite database, and any model reference (the trial folder).
    csv_path = tmp_path / "questions.csv"
    csv_path.write_text(
        "question,sql\nHow many museums opened after 1960?,SELECT count(*) FROM museum "
        "WHERE open_year > 1960\nList the museum names.,SELECT name FROM museum\n"
    )
    out2 = tmp_path / "report-csv"
    rc, _, err = _cli(
        [
            "evaluate",
            "--model",
            str(trained.trial),
            "--data",
            str(csv_path),
            "--db",
            db,
            "--no-progress",
            "--no-base",
            "--out",
            str(out2),
        ],
        capsys,
    )
    assert rc == 0, err
    rows2 = json.loads((out2 / "report.json").read_text())["examples"]
    assert [r["gold"] for r in rows2] == [
        "SELECT count(*) FROM museum WHERE open_year > 1960",
        "SELECT name FROM museum",
    ]
    assert [r["fine-tuned_correct"] for r in rows2] != ["n/a", "n/a"]  # judged on the DB

    for args, message in (
        (["--model", "org/not-cached-anywhere", "--data", str(trained.spider)], "Hub id"),
        (["--model", "models:/nothing@champion", "--data", str(trained.spider)], "MLFLOW"),
        (["--checkpoint", str(trained.checkpoint), "--data", str(tmp_path / "nope")], "no such"),
        (["--checkpoint", str(trained.checkpoint), "--data", str(csv_path)], "--db"),
    ):
        rc, _, err = _cli(["evaluate", *args, "--no-progress"], capsys)
        assert rc == 2 and message in _error(err), (args, err)


# ------------------------------------------------------------------------------------------
# A damaged checkpoint manifest, curves.png


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"hyperparameters": {', "invalid JSON at line 1, column 22"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"hyperparameters": {"model": {}}}', "'format_plan' must be an object, found missing"),
        ('{"hyperparameters": {"bogus": 1}, "format_plan": {}}', "unknown key(s) 'bogus'"),
        (b"\xff\xfe{}", "not UTF-8 text"),
    ],
)
def test_damaged_manifest_is_one_message_naming_the_file(
    trained: Trained,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes,
    message: str,
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, ckpt)
    manifest = ckpt / "text2sql.json"
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(content)
    for args in (
        ["evaluate", "--checkpoint", str(ckpt), "--no-progress"],
        ["ask", "--model", str(ckpt), "--schema", "CREATE TABLE t (a)", "q?"],
    ):
        rc, _, err = _cli(args, capsys)
        assert rc == 2, err
        line = _error(err)
        assert line.startswith(f"error: checkpoint manifest {manifest} is damaged"), err
        assert message in line and "this is a bug" not in err


def test_curves_png_plots_the_trials_metric_history(trained: Trained, tmp_path: Path) -> None:
    from evaluation.curves import series, trial_curves
    from trainer.run_store import TrialDir, read_jsonl

    png = trial_curves(trained.trial, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = TrialDir(trained.trial).metric_history()
    steps, losses = series(history, "training", "loss")
    records = [r for r in read_jsonl(trained.trial / "metrics.jsonl") if "loss" in r["metrics"]]
    assert steps == [r["steps_completed"] for r in records] == list(range(1, STEPS + 1))
    assert losses == [r["metrics"]["loss"] for r in records]
    assert series(history, "validation", "eval_execution_accuracy")[0] == [STEPS]
    from evaluation.curves import plot_curves

    assert plot_curves({"training": [], "validation": []}, tmp_path / "none.png") is None
