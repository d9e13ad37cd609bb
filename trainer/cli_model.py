"""``text2sql ask``, ``export``, ``data fetch``, ``data inspect`` and ``evaluate --model/--data``.

The sub-commands that take a trained model somewhere: ask it about your own database, export
it as a standalone HuggingFace folder, score any model on any data; and the data tools.
`trainer.cli` wires them in (``add_*_parser``); everything here raises `UserError` for what
the user got wrong.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path
from typing import Any

from cluster.export import base_hub_id, check_push_args, export_checkpoint, push_to_hub
from cluster.model_ref import checkpoint_folder, open_model, schema_style_hint
from dataset_utils import downloads
from dataset_utils.downloads import ENV_BASE, REGISTRY
from dataset_utils.errors import UserError
from dataset_utils.eval_source import load_eval_examples
from dataset_utils.inspect import DEFAULT_CANDIDATES, inspect_data
from evaluation.checkpoint_eval import compare_models, summary_table, test_examples
from evaluation.curves import trial_curves
from evaluation.databases import cached_database
from evaluation.judge import score
from evaluation.report import log_report_to_mlflow, write_report
from trainer.checkpoint import load_checkpoint, read_manifest
from trainer.experiment import load_experiment
from trainer.modeling import load_tokenizer
from trainer.training_data import build_datasets

# ---------------------------------------------------------------------------------------------
# data fetch


def add_data_fetch_parser(dsub: Any) -> None:
    names = sorted(REGISTRY)
    f = dsub.add_parser(
        "fetch",
        help="download a dataset's official release (with its databases) into the cache",
        description="Download, verify (SHA-256) and unpack a dataset's official release into "
        "$TEXT2SQL_CACHE/data/<name> (default ~/.cache/text2sql/data), where runs find it "
        "when no local data folder has it. Interrupted downloads resume. "
        f"{ENV_BASE}=<url> fetches from a mirror holding the same file; HF_HUB_OFFLINE=1 "
        "forbids downloading (use --archive with a copy downloaded elsewhere).",
    )
    f.add_argument("name", choices=names, help="dataset: " + ", ".join(names))
    f.add_argument("--archive", help="a copy of the release archive (e.g. downloaded in a browser)")
    f.add_argument("--sha256", help="expected SHA-256 of the archive (overrides the registry's)")
    f.add_argument("--force", action="store_true", help="unpack again even if already fetched")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_data_fetch)


def cmd_data_fetch(ns: argparse.Namespace) -> int:
    entry = downloads.get(ns.name)
    already = downloads.fetched_path(entry)
    path = downloads.fetch(
        ns.name,
        archive=ns.archive,
        sha256=ns.sha256,
        force=ns.force,
        progress=not ns.no_progress,
    )
    if already is not None and not ns.force:
        print(f"{ns.name}: already fetched in {path}")
    else:
        print(f"{ns.name}: ready in {path} ({entry.license}; {entry.page})")
    print(f"runs without a local {ns.name} folder now read it from there")
    return 0


# ---------------------------------------------------------------------------------------------
# ask


def add_ask_parser(sub: Any) -> None:
    a = sub.add_parser(
        "ask",
        help="ask a trained model about your database: prints the SQL and the first rows",
        description="Generate SQL for a question about a database with a trained model, then "
        "run it read-only (sandboxed, time-limited) and print the first rows. --model is a "
        "checkpoint or trial folder, an MLflow model URI (models:/<name>@champion; the store "
        "is $MLFLOW_TRACKING_URI or <runs-dir>/mlflow.db), an exported folder or a Hub id. "
        "Without a question, asks interactively (one question per line; an empty line or "
        "Ctrl-D ends).",
    )
    a.add_argument("question", nargs="?", help="the question (omit for interactive mode)")
    a.add_argument(
        "--model", required=True, help="checkpoint | trial folder | models:/... | hub id"
    )
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", help="a SQLite file or an SQLAlchemy URL (opened read-only)")
    g.add_argument("--schema", help="the schema as CREATE TABLE statements (or @file.sql)")
    a.add_argument(
        "--schema-only",
        action="store_true",
        help="only generate the SQL; do not run it (the database is read for its schema)",
    )
    a.add_argument("--max-rows", type=int, default=10, help="rows to print (default 10)")
    a.add_argument(
        "--runs-dir",
        default=os.environ.get("TEXT2SQL_RUNS", "runs"),
        help="where the local MLflow store is (for models:/ URIs; default ./runs)",
    )
    a.set_defaults(func=cmd_ask)


def _schema_text(value: str) -> str:
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        if not path.is_file():
            raise UserError(f"--schema {value}: no such file")
        return path.read_text(encoding="utf-8")
    return value


def format_rows(columns: list[str], rows: list[list[Any]], *, truncated: bool) -> str:
    """A plain-text table (cells cut at 40 characters)."""

    def cell(v: Any) -> str:
        text = "NULL" if v is None else str(v)
        return text if len(text) <= 40 else text[:39] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    n = len(rows)
    lines.append(f"({n} row{'s' if n != 1 else ''}{', more not shown' if truncated else ''})")
    return "\n".join(lines)


def cmd_ask(ns: argparse.Namespace) -> int:
    if ns.max_rows < 1:
        raise UserError(f"--max-rows must be >= 1, found {ns.max_rows}")
    schema = _schema_text(ns.schema) if ns.schema else None
    if ns.db:
        cached_database(ns.db)  # a missing or non-SQLite file fails before the model loads
    opened = open_model(ns.model, runs_dir=ns.runs_dir)
    answerer = opened.answerer
    execute = bool(ns.db) and not ns.schema_only

    def one(question: str) -> None:
        answer = answerer.answer(
            [question], schemas=[schema], dbs=[ns.db], execute=execute, max_rows=ns.max_rows
        )[0]
        print(f"SQL: {answer.sql or '(empty)'}", flush=True)
        if not execute:
            return
        if answer.error:
            print(f"error: the query did not run: {answer.error}", flush=True)
        else:
            print(format_rows(answer.columns or [], answer.rows or [], truncated=answer.truncated))

    if ns.question:
        one(ns.question)
        return 0
    where = ns.db or "the given schema"
    print(
        f"{opened.label}: ask about {where} (one question per line; empty line or Ctrl-D quits)",
        flush=True,
    )
    while True:
        try:
            question = input("question> ")
        except EOFError:
            print()
            break
        if not question.strip() or question.strip().lower() in {"exit", "quit"}:
            break
        one(question.strip())
    return 0


# ---------------------------------------------------------------------------------------------
# export


def add_export_parser(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="checkpoint -> standalone HuggingFace model folder (optionally pushed to the Hub)",
        description="Write a folder that loads with AutoModelForCausalLM.from_pretrained(folder) "
        "anywhere: the LoRA adapter merged into its base (default; exact), or --adapter with "
        "the base named by its Hub id. Tokenizer, chat template (the training prompt), "
        "generation config and a model card are included.",
    )
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a checkpoint folder (with text2sql.json)")
    g.add_argument("--trial-dir", help="a local trial folder: its best checkpoint is exported")
    x.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    x.add_argument(
        "--adapter",
        action="store_true",
        help="write the adapter alone, with a Hub id as its base (see --base-id)",
    )
    x.add_argument("--base-id", help="--adapter: the Hub id of the base model's weights")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to <user>/<name>")
    x.add_argument("--private", action="store_true", help="--push-to-hub: a private repo")
    x.set_defaults(func=cmd_export)


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.base_id and not ns.adapter:
        raise UserError("--base-id only applies with --adapter")
    check_push_args(ns.push_to_hub)
    ref = ns.checkpoint or ns.trial_dir
    found = checkpoint_folder(ref)
    if found is None:
        raise UserError(f"{ref} is not a checkpoint folder (text2sql.json) or a trial folder")
    out = Path(ns.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")
    if ns.adapter:
        if not (found[0] / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {found[0]} is a full fine-tune, it has no adapter")
        model = (read_manifest(found[0])["hyperparameters"].get("model") or {}).get(
            "name_or_path", ""
        )
        base_hub_id(str(model), ns.base_id)  # refuses a local base before the model loads
    loaded = load_checkpoint(found[0])
    folder, notes = export_checkpoint(loaded, out, adapter_only=ns.adapter, base_id=ns.base_id)
    for note in notes:
        print(f"note: {note}")
    kind = "adapter" if ns.adapter else "merged model"
    print(f"exported {found[0].name} ({kind}) to {folder}")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    if ns.push_to_hub:
        print(f"pushed: {push_to_hub(folder, ns.push_to_hub, private=ns.private)}")
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate --model / --data


def add_evaluate_data_args(e: argparse.ArgumentParser) -> None:
    e.add_argument(
        "--data",
        help="score on this data instead of the checkpoint's own split: a Spider-layout folder, "
        "or a CSV/JSON(L)/Parquet file (with --db)",
    )
    e.add_argument("--data-split", help="--data: which split of a Spider folder (default dev)")
    e.add_argument(
        "--db",
        help="--data: a SQLite file every row runs on, or a folder of <db_id>/<db_id>.sqlite",
    )
    e.add_argument("--format", help="--data: force the format (spider, custom, ...)")
    e.add_argument(
        "--columns",
        help="--data with format custom: question=<col>,sql=<col>[,context=<col>,db_id=<col>]",
    )
    e.add_argument(
        "--schema-style",
        choices=("ddl", "compact", "columns"),
        help="--data: schema rendering (default: what the model was trained with)",
    )


def _parse_columns(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise UserError(f"--columns {text!r}: expected key=column pairs, e.g. question=q,sql=s")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def cmd_evaluate_any(ns: argparse.Namespace) -> int:
    """``evaluate`` with ``--model`` and/or ``--data``: any model on any data, same report."""
    ref = ns.model or ns.checkpoint or ns.trial_dir
    columns = _parse_columns(ns.columns)

    def load_data(style: str) -> tuple[list[Any], str]:
        return load_eval_examples(
            ns.data,
            fmt=ns.format,
            split=ns.data_split,
            db=ns.db,
            schema_style=style,
            columns=columns,
            limit=ns.limit,
        )

    # Bad data is reported before a model is loaded, wherever the schema style is known.
    style = ns.schema_style or (schema_style_hint(ref) if ns.data else None)
    data = load_data(style) if ns.data and style else None
    opened = open_model(ref)
    if ns.data:
        examples, origin = data or load_data(opened.answerer.schema_style)
        data_name = Path(ns.data.rstrip("/")).name
    else:
        if opened.loaded is None:
            raise UserError(
                f"--model {ref}: only a checkpoint knows its own held-out split; give --data"
            )
        examples, origin = test_examples(opened.loaded, ns.limit, split=ns.split), ns.split
        data_name = f"{ns.split} split"
    print(f"evaluating {opened.label} on {len(examples)} examples from {origin}", flush=True)
    if opened.loaded is not None:
        results = compare_models(
            opened.loaded, examples, with_base=not ns.no_base, progress=not ns.no_progress
        ).results
    else:
        sql = opened.answerer.generate(examples, progress=not ns.no_progress)
        results = {
            "model": score(
                examples, sql, timeout_s=opened.answerer.timeout_s, progress=not ns.no_progress
            )
        }
    if ns.out:
        out = Path(ns.out)
    elif ns.data or opened.loaded is None:
        out = Path("evaluation") / f"{_slug(opened.label)}-{_slug(data_name)}"
    else:
        out = opened.loaded.path / "evaluation"
    paths = write_report(
        results, examples, out, title=f"Evaluation of {opened.label} on {data_name}"
    )
    print(summary_table(results))
    print(f"\nreport: {paths['markdown']}\njson:   {paths['json']}\nchart:  {paths['png']}")
    if opened.trial_dir is not None:
        curves = trial_curves(opened.trial_dir, out / "curves.png")
        if curves:
            print(f"curves: {curves}")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        run_id = log_report_to_mlflow(paths, results, run_name=f"evaluate-{_slug(opened.label)}")
        print(f"logged to MLflow run {run_id}")
    return 0


# ---------------------------------------------------------------------------------------------
# data inspect


def run_inspect(ns: argparse.Namespace) -> int:
    """Load the experiment, inspect its data, print the report. Raises `UserError` on bad input."""
    exp = load_experiment(ns.experiment, ns.set)
    data, model = exp.hparams.data, exp.hparams.model
    tokenizer = load_tokenizer(model)
    prepared = None
    if ns.examples > 0:
        try:  # the trainer's own pipeline: the rows shown are the rows trained on
            prepared = build_datasets(exp.hparams, tokenizer)
        except UserError as e:  # e.g. every row over max_length: still show the lengths
            print(f"note: the trainer would refuse this data ({e}); examples from the subset")
    report = inspect_data(
        [s.to_spec() for s in data.sources],
        tokenizer,
        chat_format=model.chat_format,
        subset=data.subset,
        number_of_samples=data.number_of_samples,
        complexity=data.complexity,
        max_length=data.max_length,
        candidate_lengths=ns.max_length or DEFAULT_CANDIDATES,
        n_examples=ns.examples,
        out_dir=Path(ns.out),
        seed=ns.seed,
        prepared=prepared,
    )
    print(f"experiment: {ns.experiment} (model {model.name_or_path})")
    print(report.format_text())
    return 0


def version() -> str:
    try:
        return md.version("text2sql-finetune")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def python_info() -> str:
    return f"Python {sys.version.split()[0]}"
