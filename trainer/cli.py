"""The ``text2sql`` command: run experiments off-cluster, inspect data, evaluate, mirror.

Every user error ends with one ``error: ...`` line and a non-zero exit; set
``TEXT2SQL_DEBUG=1`` to see the traceback of an unexpected failure.

The commands that train or talk to MLflow / Determined import their modules when they run
(`trainer.local_runner` and `trainer.training` pull in torch + transformers, `cluster.mirror`
mlflow, `cluster.checkpoint_source` determined), so ``text2sql --help`` and ``validate`` load
none of those (they do load sqlglot and jsonschema, which every command needs: ~0.7 s).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster.expconf import ENV_SCHEMA_DIR, default_schema_dir
from cluster.local_source import LocalCheckpointSource
from cluster.mlflow_tracking import default_tracking_uri
from cluster.model_ref import checkpoint_folder
from dataset_utils.errors import UserError
from dataset_utils.inspect import add_inspect_arguments
from evaluation.checkpoint_eval import (
    compare_models,
    decoding_with,
    side_by_side,
    summary_table,
    test_examples,
)
from evaluation.curves import trial_curves
from evaluation.report import log_report_to_mlflow, write_report
from trainer.checkpoint import load_checkpoint
from trainer.cli_model import (
    add_ask_parser,
    add_data_fetch_parser,
    add_evaluate_data_args,
    add_export_parser,
    cmd_evaluate_any,
    run_inspect,
    version,
)
from trainer.experiment import (
    _context_dir,
    apply_overrides,
    check_local_inputs,
    load_experiment,
    parse_override,
    read_yaml,
)
from trainer.memory import estimate, gpu_needed, markdown_table, max_tokens, plan_for_experiment


def _cmd_run(ns: argparse.Namespace) -> int:
    from trainer.local_runner import evaluate_trial, launch

    if ns.slots is not None and ns.slots < 1:
        raise UserError(f"--slots must be >= 1, found {ns.slots}")
    exp = load_experiment(ns.experiment, ns.set)
    check_local_inputs(exp)
    if ns.prepare_only:
        from trainer.local_runner import deepspeed_config_path
        from trainer.training import prepare

        r = prepare(exp.hparams, deepspeed=deepspeed_config_path(exp))
        print(
            f"prepared: {r['n_train']} train / {r['n_valid']} valid / {r['n_test']} test "
            f"examples (data cache {r['cache']}); configuration valid, nothing trained"
        )
        return 0
    result = launch(exp, Path(ns.runs_dir), new=ns.new, progress=not ns.no_progress, slots=ns.slots)
    summary = result.summary or {}
    if summary.get("preempted"):
        print(
            f"preempted at step {summary.get('global_step')}: checkpoint saved in "
            f"{result.trial.path}; run the same command again to resume"
        )
        return 0
    print(
        f"training finished: {summary.get('global_step')} steps in "
        f"{summary.get('seconds', 0):.0f} s; trial folder {result.trial.path}"
    )

    curves = trial_curves(result.trial.path)
    if curves:
        print(f"curves: {curves}")
    if ns.no_eval:
        return 0
    # Stage 2: evaluate the best checkpoint on the test split (with or without MLflow).
    evaluation = evaluate_trial(result.trial.path, progress=not ns.no_progress)
    if ns.no_mirror:
        print(f"\n{evaluation.table}\n\nreport: {evaluation.paths['markdown']}")
        if evaluation.curves is not None:
            print(f"curves: {evaluation.curves}")
        print(f"MLflow: skipped (--no-mirror); text2sql mirror --trial-dir {result.trial.path}")
        return 0
    # Stage 3: mirror params, history, the evaluation above and the model into MLflow.
    from cluster.mirror import mirror_local_trial

    mirror_local_trial(result.trial.path, progress=not ns.no_progress, evaluation=evaluation)
    return 0


def _cmd_validate(ns: argparse.Namespace) -> int:
    if ns.schemas:
        os.environ[ENV_SCHEMA_DIR] = ns.schemas
    # Schemas the user pointed at must exist; without any, the project's own field checks run.
    explicit = bool(ns.schemas or os.environ.get(ENV_SCHEMA_DIR))
    full = default_schema_dir().is_dir()
    if not full and not explicit:
        logging.getLogger("trainer.experiment").setLevel(logging.ERROR)  # the notice below says it
        print(
            f"note: Determined's expconf schemas are not at {default_schema_dir()}: checking the "
            "fields this project reads (types, ranges, unknown keys) and the trainer's "
            "hyperparameters. For Determined's full schema check, pass --schemas <Determined's "
            f"schemas/expconf/v0> or set {ENV_SCHEMA_DIR}"
        )
    for path in ns.experiments:
        exp = load_experiment(path, ns.set, schema_required=explicit)
        print(
            f"ok: {path} ({exp.launcher} launcher, {exp.slots} slot(s), method "
            f"{exp.hparams.method}; {'Determined schema' if full else 'project field checks'})"
        )
    return 0


def _decoding_overrides(items: Sequence[str]) -> dict[str, object]:
    """``--decoding num_beams=4 --decoding execution_guided=true`` as a dict (checked later
    against `trainer.config.DecodingArgs`, which names the valid keys)."""
    out: dict[str, object] = {}
    for item in items:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise UserError(f"--decoding {item!r}: expected KEY=VALUE, e.g. num_beams=4")
        out[parts[0]] = value
    return out


def _add_decoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--decoding",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's eval.decoding for this evaluation (repeatable): "
        "num_beams=4, execution_guided=true, schema_constrained=true",
    )


def _cmd_memory(ns: argparse.Namespace) -> int:
    paths = [Path(p) for p in ns.experiments]
    if ns.markdown:
        print(markdown_table(paths, _context_dir(paths[0])))
        return 0
    for path in paths:
        config = read_yaml(path)
        apply_overrides(config, ns.set)
        plan = plan_for_experiment(config, _context_dir(path))
        est = estimate(plan)
        need = gpu_needed(est.total)
        print(f"{path}: {plan.tokens:,} tokens per micro-batch: {est.summary()}")
        for note in est.notes:
            print(f"  {note}")
        print(f"  smallest GPU with 10% headroom: {f'{need} GB' if need else 'none listed'}")
        if ns.gpu_gb:
            budget = max_tokens(plan, ns.gpu_gb)
            print(f"  largest micro-batch on a {ns.gpu_gb:g} GB GPU: {budget:,} tokens")
    return 0


def _cmd_mirror(ns: argparse.Namespace) -> int:
    from cluster.mirror import mirror, mirror_local_trial, print_where_to_look

    if ns.trial_dir:
        mirror_local_trial(
            ns.trial_dir,
            tracking_uri=ns.tracking_uri,
            experiment_name=ns.name,
            registered_model_name=ns.registered_model_name,
            progress=not ns.no_progress,
            decoding=_decoding_overrides(ns.decoding),
        )
        return 0
    from cluster.checkpoint_source import DeterminedCheckpointSource

    source = DeterminedCheckpointSource(ns.experiment_id, master=ns.master)
    if ns.wait:
        print(f"waiting for experiment {ns.experiment_id} to complete (poll {ns.poll:.0f} s)...")
        source.wait_until_done(poll_s=ns.poll, timeout_s=ns.timeout)
    info = source.best_checkpoint()
    name = ns.name or str(info.experiment_config.get("name") or f"experiment-{ns.experiment_id}")
    uri = ns.tracking_uri or default_tracking_uri(Path(ns.runs_dir))
    result = mirror(
        source,
        tracking_uri=uri,
        experiment_name=name,
        registered_model_name=ns.registered_model_name or name,
        work_dir=Path(ns.work_dir) if ns.work_dir else None,
        progress=not ns.no_progress,
        decoding=_decoding_overrides(ns.decoding),
    )
    print(result.summary)
    print_where_to_look(result)
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    if getattr(ns, "model", None) or getattr(ns, "data", None):
        if ns.command == "compare":
            raise UserError("compare takes --checkpoint or --trial-dir (base vs fine-tuned)")
        return cmd_evaluate_any(ns)

    overrides = _decoding_overrides(ns.decoding)
    ckpt = _checkpoint_dir(ns)
    loaded = load_checkpoint(ckpt)
    decoding = decoding_with(loaded.hp.eval.decoding, overrides)
    examples = test_examples(loaded, ns.limit, split=ns.split)
    if ns.command == "compare":
        idx = sorted(random.Random(ns.seed).sample(range(len(examples)), min(ns.n, len(examples))))
        examples = [examples[i] for i in idx]
    comparison = compare_models(
        loaded, examples, with_base=not ns.no_base, progress=not ns.no_progress, decoding=decoding
    )
    if ns.command == "compare":
        print(side_by_side(comparison, len(examples)))
        print()
        print(summary_table(comparison.results))
        return 0

    out = Path(ns.out or (ckpt / "evaluation"))
    paths = write_report(
        comparison.results,
        examples,
        out,
        title=f"Evaluation of {ckpt.name} ({ns.split} split)",
        decoding=comparison.decoding,
    )
    print(summary_table(comparison.results))
    print(f"\nreport: {paths['markdown']}\njson:   {paths['json']}\nchart:  {paths['png']}")

    trial = (checkpoint_folder(ckpt) or (ckpt, None))[1]
    curves = trial_curves(trial, out / "curves.png") if trial is not None else None
    if curves:
        print(f"curves: {curves}")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        run_id = log_report_to_mlflow(paths, comparison.results, run_name=f"evaluate-{ckpt.name}")
        print(f"logged to MLflow run {run_id}")
    return 0


def _checkpoint_dir(ns: argparse.Namespace) -> Path:
    if ns.checkpoint:
        p = Path(ns.checkpoint)
        if not p.is_dir():
            raise UserError(f"checkpoint folder {p} does not exist")
        return p

    source = LocalCheckpointSource(ns.trial_dir)
    return source.local_path(source.best_checkpoint())


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a checkpoint folder (with text2sql.json)")
    g.add_argument("--trial-dir", help="a local trial folder: its best checkpoint is used")
    g.add_argument(
        "--model",
        help="any model: a checkpoint or trial folder, an MLflow URI (models:/<name>@<alias>), "
        "an exported folder or a Hub id (a model without its own split needs --data)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "valid"],
        help="held-out split to use (default: test)",
    )
    p.add_argument("--no-base", action="store_true", help="skip the base model")
    _add_decoding_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="text2sql",
        description="Fine-tune LLMs on text-to-SQL with Determined experiment YAMLs, on a cluster "
        "or on this machine; evaluate by execution accuracy; ship to MLflow.",
    )

    p.add_argument("--version", action="version", version=f"text2sql {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run",
        help="run an experiment YAML off-cluster (train, evaluate, register in MLflow)",
        description="Run the experiment's trainer off-cluster with slots_per_trial processes "
        "(capped to the CPUs present), honouring its launcher. Re-running resumes an unfinished "
        "trial. Three stages: train; evaluate the best checkpoint against the base model on "
        "the held-out test split (report in <trial>/evaluation-<uuid8>/); mirror it to MLflow "
        "(skip with --no-mirror).",
    )
    r.add_argument(
        "experiment", help="experiment YAML, e.g. experiments/smollm2-135m-lora-cpu.yaml"
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyperparameter (training_args.max_steps=10) or a top-level "
        "key (resources.slots_per_trial=1); repeatable",
    )
    r.add_argument(
        "--runs-dir",
        default=os.environ.get("TEXT2SQL_RUNS", "runs"),
        help="where trials, checkpoints and the local MLflow store live "
        "(default: ./runs or $TEXT2SQL_RUNS)",
    )
    r.add_argument("--new", action="store_true", help="start a new trial instead of resuming")
    r.add_argument("--slots", type=int, help="override the number of local processes")
    r.add_argument(
        "--no-mirror",
        action="store_true",
        help="train and evaluate (the report is written to <trial>/evaluation-<uuid8>/); "
        "skip only MLflow (text2sql mirror --trial-dir logs it later)",
    )
    r.add_argument(
        "--no-eval",
        action="store_true",
        help="only train: skip the evaluation and MLflow stages",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--prepare-only",
        action="store_true",
        help="validate everything and tokenize + cache the data, then stop (no training, no "
        "trial folder)",
    )
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser(
        "validate",
        help="check experiment YAMLs before submitting them",
        description="Validate against Determined's schema and the trainer's "
        "hyperparameter dataclasses, without loading any model.",
    )
    v.add_argument("experiments", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument(
        "--schemas",
        metavar="DIR",
        help="Determined's expconf JSON schemas (schemas/expconf/v0 of Determined's source; "
        "default: $TEXT2SQL_EXPCONF_DIR or ../shared/determined/expconf-v0). Without them, "
        "the fields this project reads are checked",
    )
    v.set_defaults(func=_cmd_validate)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint vs its base model, or any model on any data (report + charts)",
        description="Generation (the checkpoint's eval.decoding, or --decoding) on the "
        "checkpoint's held-out split (or, with --data, on any Spider-layout folder or "
        "CSV/JSON(L) file with its database), execution accuracy "
        "in a read-only SQLite sandbox, exact match, valid/executable SQL, BLEU; "
        "writes report.json, report.md, per_example.csv and charts (exec_accuracy.png, "
        "exec_accuracy_hardness.png per Spider hardness level, errors.png by error category, "
        "and curves.png for a checkpoint of a local trial); logs to MLflow when "
        "MLFLOW_TRACKING_URI is set.",
    )
    _add_checkpoint_args(e)
    e.add_argument("--limit", type=int, help="evaluate the first N examples only")
    e.add_argument(
        "--out",
        help="report folder (default: <checkpoint>/evaluation; with --data or a non-checkpoint "
        "model: ./evaluation/<model>-<data>)",
    )

    add_evaluate_data_args(e)
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser(
        "compare",
        help="N random held-out examples side by side: base vs adapter",
        description="Question, gold SQL, base and fine-tuned SQL, and whether each "
        "is correct by execution.",
    )
    _add_checkpoint_args(c)
    c.add_argument("-n", type=int, default=10, help="how many examples (default 10)")
    c.add_argument("--seed", type=int, default=0, help="which random examples")
    c.set_defaults(func=_cmd_evaluate, limit=None)

    mem = sub.add_parser(
        "memory",
        help="GPU memory per GPU of an experiment, from the memory model (no GPU needed)",
        description="Weights, gradients, optimizer states, buffers, activations and logits per "
        "GPU for the experiment's largest trial (trainer/memory.py), the smallest common GPU "
        "that holds it with 10%% headroom, and with --gpu-gb the largest micro-batch in tokens "
        "that fits that GPU.",
    )
    mem.add_argument("experiments", nargs="+")
    mem.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    mem.add_argument("--gpu-gb", type=float, help="also size the token budget for this GPU")
    mem.add_argument(
        "--markdown", action="store_true", help="print benchmarks/README.md's GPU table"
    )
    mem.set_defaults(func=_cmd_memory)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser(
        "inspect",
        help="subset sizes, token-length histogram, max_length drops, examples",
        description="Load an experiment's data as the trainer would and report subset sizes, a "
        "token-length histogram (PNG), how many samples each max_length would drop, and a few "
        "rendered prompt/completion examples.",
    )
    add_inspect_arguments(di)
    di.set_defaults(func=run_inspect)
    add_data_fetch_parser(dsub)

    m = sub.add_parser(
        "mirror",
        help="best checkpoint -> evaluate -> MLflow (run, model, version)",
        description="Find the best checkpoint (Determined SDK, or a local trial), "
        "verify its files, evaluate it against the base model, and mirror params, "
        "metric history, datasets, description, git commit, report and the model into "
        "MLflow, with one MLflow evaluation run per model (base, fine-tuned) judged by "
        "execution; register a version and move the 'champion' alias if it wins. "
        "Re-running is a no-op. Credentials "
        "come only from the environment (DET_USER/DET_PASS or `det user login`, "
        "MLFLOW_TRACKING_TOKEN...).",
    )
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--experiment-id", type=int, help="Determined experiment id")
    g.add_argument("--trial-dir", help="local trial folder (runs/<experiment>/trial-<n>)")
    m.add_argument("--master", help="Determined master URL (default: $DET_MASTER)")
    m.add_argument("--wait", action="store_true", help="follow a running experiment until done")
    m.add_argument("--poll", type=float, default=30.0, help="--wait polling interval (s)")
    m.add_argument("--timeout", type=float, help="--wait limit (s)")
    m.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
        "else a SQLite store in --runs-dir)",
    )
    m.add_argument("--runs-dir", default=os.environ.get("TEXT2SQL_RUNS", "runs"))
    m.add_argument(
        "--name", help="MLflow experiment name (default: the Determined / local experiment's)"
    )
    m.add_argument("--registered-model-name", help="registry name (default: experiment name)")
    m.add_argument("--work-dir", help="where checkpoints are downloaded (default: a temp dir)")
    _add_decoding_arg(m)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_cmd_mirror)

    add_ask_parser(sub)
    add_export_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if os.environ.get("TEXT2SQL_DEBUG"):
            raise
        full = _disk_full(e)
        if full is not None:
            print(f"error: {full}", file=sys.stderr)
            return 1
        print(
            f"error: unexpected {type(e).__name__}: {e} (set TEXT2SQL_DEBUG=1 for the "
            "traceback; this is a bug, please report it)",
            file=sys.stderr,
        )
        return 1


def _disk_full(exc: BaseException) -> str | None:
    """A one-line explanation when ``exc`` (or what caused it) is a full disk, else None.

    Libraries report it in their own ways (``OSError`` errno 28, safetensors' ``IoError``
    text, torch's ``file write failed``), often wrapped, so the chain is searched."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        where = getattr(e, "filename", None)
        if (
            (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or "No space left on device" in text
            or "StorageFull" in text
        ):
            return (
                "no space left on device"
                + (f" while writing {where}" if where else "")
                + "; every checkpoint already stored in the trial folder is complete. Free "
                "space and run the same command again to resume"
            )
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
