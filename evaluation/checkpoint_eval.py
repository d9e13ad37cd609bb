"""Evaluate a fine-tuning checkpoint against its base model on the held-out test split.

A checkpoint folder (from the local run store, or from Determined checkpoint storage / the SDK,
where the files sit in ``checkpoint-<step>/``: see `trainer.checkpoint`) carries ``text2sql.json``:
the resolved hyperparameters and prompt format it was trained with. From it we rebuild the
exact test split (same sources, subset, split seed; the dataset cache makes this instant), load
the model -- base + LoRA adapter (safetensors), or the full fine-tuned weights -- and generate
for the adapter and, with the adapter disabled, for the base model, with the checkpoint's
``eval.decoding`` (or an override). Every prediction
is judged by execution in the sandbox.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils.hardness import HARDNESS_LEVELS
from dataset_utils.records import Example
from evaluation.curves import plot_curves
from evaluation.generation import Generation, generate_sql
from evaluation.judge import EvalResult, GoldCache, score
from evaluation.report import write_report
from trainer.checkpoint import LoadedCheckpoint, load_checkpoint
from trainer.config import DecodingArgs, from_dict
from trainer.modeling import load_model
from trainer.training_data import build_datasets

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    examples: list[Example]
    generations: dict[str, Generation] = field(default_factory=dict)
    results: dict[str, EvalResult] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)  # DecodingArgs used, as a dict


def test_examples(
    loaded: LoadedCheckpoint, limit: int | None = None, split: str = "test"
) -> list[Example]:
    """The held-out split the checkpoint was trained without (rebuilt from its manifest)."""
    data = build_datasets(loaded.hp, loaded.tokenizer)
    rows = data.examples[split]
    n = limit if limit is not None else loaded.hp.eval.test_samples
    return rows[:n] if n is not None else rows


def decoding_with(base: Any, overrides: dict[str, Any] | None) -> Any:
    """``base`` (a `trainer.config.DecodingArgs`) with ``overrides`` applied and checked."""
    if not overrides:
        return base
    return from_dict(DecodingArgs, {**asdict(base), **overrides}, "decoding")


def load_base(loaded: LoadedCheckpoint) -> Any:
    return load_model(loaded.hp.model).eval()


def compare_models(
    loaded: LoadedCheckpoint,
    examples: list[Example],
    *,
    with_base: bool = True,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    gold_cache: GoldCache | None = None,
    decoding: Any = None,
) -> Comparison:
    """Generate + judge for the fine-tuned model and (optionally) its base.

    ``decoding``: a `trainer.config.DecodingArgs`; None = the checkpoint's ``eval.decoding``.
    Both models are decoded the same way.
    """
    bs = batch_size or loaded.hp.eval.batch_size
    mnt = max_new_tokens or loaded.hp.eval.max_new_tokens
    options = asdict(decoding if decoding is not None else loaded.hp.eval.decoding)
    timeout_s = loaded.hp.eval.timeout_s
    cache = gold_cache or GoldCache()
    out = Comparison(examples=examples, decoding=options)
    models: list[tuple[str, Any]] = []
    if with_base:
        models.append(("base", None))
    models.append(("fine-tuned", loaded.model))
    for label, model in models:
        if label == "base" and loaded.is_adapter:
            with loaded.model.disable_adapter():
                gen = generate_sql(
                    loaded.model,
                    loaded.tokenizer,
                    examples,
                    loaded.plan,
                    batch_size=bs,
                    max_new_tokens=mnt,
                    progress=progress,
                    desc="base model",
                    timeout_s=timeout_s,
                    **options,
                )
        else:
            m = model if model is not None else load_base(loaded)
            gen = generate_sql(
                m,
                loaded.tokenizer,
                examples,
                loaded.plan,
                batch_size=bs,
                max_new_tokens=mnt,
                progress=progress,
                desc=f"{label} model",
                timeout_s=timeout_s,
                **options,
            )
        log.info("%s: %d prompts in %.1f s", label, len(examples), gen.seconds)
        out.generations[label] = gen
        out.results[label] = score(
            examples,
            gen.sql,
            timeout_s=loaded.hp.eval.timeout_s,
            gold_cache=cache,
            progress=progress,
        )
    return out


def summary_table(results: dict[str, EvalResult]) -> str:
    """Side-by-side table of the headline metrics (plain text, for the terminal)."""
    labels = list(results)
    rows = [
        ("examples", lambda r: f"{r.overall.n}"),
        ("execution accuracy", lambda r: f"{100 * r.overall.exec_accuracy:.1f}%"),
        ("exact match", lambda r: f"{100 * r.overall.exact_match:.1f}%"),
        ("executable SQL", lambda r: f"{100 * r.overall.executable_rate:.1f}%"),
        ("valid SQL", lambda r: f"{100 * r.overall.valid_sql_rate:.1f}%"),
        ("BLEU", lambda r: f"{r.overall.bleu:.1f}"),
    ]
    order = {"easy": 0, "medium": 1, "hard": 2}
    diffs = sorted(
        {d for r in results.values() for d in r.by_difficulty if d != "(none)"},
        key=lambda d: (order.get(d, 9), d),
    )
    for d in diffs:
        rows.append(
            (
                f"exec. accuracy ({d})",
                lambda r, d=d: (
                    f"{100 * r.by_difficulty[d].exec_accuracy:.1f}% (n={r.by_difficulty[d].n})"
                    if d in r.by_difficulty
                    else "-"
                ),
            )
        )
    for level in HARDNESS_LEVELS:
        if not any(level in r.by_hardness for r in results.values()):
            continue
        rows.append(
            (
                f"exec. accuracy (Spider {level})",
                lambda r, h=level: (
                    f"{100 * r.by_hardness[h].exec_accuracy:.1f}% (n={r.by_hardness[h].n})"
                    if h in r.by_hardness
                    else "-"
                ),
            )
        )
    sources = sorted({s for r in results.values() for s in r.by_source if s != "(none)"})
    for src in sources if len(sources) > 1 else []:
        for what, attr in (("exec. accuracy", "exec_accuracy"), ("executable", "executable_rate")):
            rows.append(
                (
                    f"{what} ({src})",
                    lambda r, s=src, a=attr: (
                        f"{100 * getattr(r.by_source[s], a):.1f}% (n={r.by_source[s].n})"
                        if s in r.by_source
                        else "-"
                    ),
                )
            )
    width = max(len(n) for n, _ in rows) + 2
    colw = max(14, *(len(lbl) + 2 for lbl in labels))
    lines = ["".ljust(width) + "".join(lbl.rjust(colw) for lbl in labels)]
    for name, fn in rows:
        lines.append(name.ljust(width) + "".join(fn(results[lbl]).rjust(colw) for lbl in labels))
    return "\n".join(lines)


def side_by_side(comparison: Comparison, n: int, seed: int = 0) -> str:
    """N random examples: question, gold, each model's SQL and whether it is correct."""
    idx = list(range(len(comparison.examples)))
    random.Random(seed).shuffle(idx)
    blocks = []
    for i in sorted(idx[:n]):
        e = comparison.examples[i]
        lines = [f"[{i}] {e.question}", f"    gold:        {e.sql}"]
        for label, gen in comparison.generations.items():
            j = comparison.results[label].judgements[i]
            mark = {True: "correct", False: "wrong", None: "unjudgeable"}[j.exec_correct]
            lines.append(f"    {label + ':':<12} {gen.sql[i] or '(empty)'}   [{mark}]")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@dataclass
class CheckpointEvaluation:
    """One checkpoint evaluated on its test split and its report written (`evaluate_checkpoint`):
    what the MLflow mirror logs, so it never evaluates the same checkpoint twice."""

    checkpoint: Path
    loaded: LoadedCheckpoint
    examples: list[Example]
    comparison: Comparison
    paths: dict[str, Path]  # write_report's files: markdown, json, png, csv
    curves: Path | None
    table: str


def report_dir_for(root: Path, uuid: str) -> Path:
    """Where a checkpoint's evaluation report goes: ``<root>/evaluation-<uuid8>/`` (for a local
    trial, ``root`` is the trial folder)."""
    return Path(root) / f"evaluation-{uuid[:8]}"


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    report_dir: Path,
    *,
    title: str,
    history: Any = None,
    curves_title: str = "",
    test_samples: int | None = None,
    decoding: dict[str, Any] | None = None,
    progress: bool = True,
) -> CheckpointEvaluation:
    """The evaluation stage of ``text2sql run`` and of the mirror: load the checkpoint, score
    it (and its base model when ``eval.compare_base``) by execution on the test split with the
    checkpoint's ``eval.decoding`` (``decoding`` overrides), and write the report -- report.md,
    report.json, exec_accuracy.png, per_example.csv and, given the metric ``history``,
    curves.png -- into ``report_dir``."""
    loaded = load_checkpoint(ckpt_dir)
    examples = test_examples(loaded, test_samples)
    comparison = compare_models(
        loaded,
        examples,
        with_base=loaded.hp.eval.compare_base,
        progress=progress,
        decoding=decoding_with(loaded.hp.eval.decoding, decoding),
    )
    paths = write_report(
        comparison.results, examples, report_dir, title=title, decoding=comparison.decoding
    )
    curves = (
        plot_curves(history, report_dir / "curves.png", title=curves_title)
        if history is not None
        else None
    )
    return CheckpointEvaluation(
        Path(ckpt_dir),
        loaded,
        examples,
        comparison,
        paths,
        curves,
        summary_table(comparison.results),
    )
