"""Evaluate a fine-tuning checkpoint against its base model on the held-out test split.

A checkpoint folder (from the local run store, or from Determined checkpoint storage / the SDK,
where the files sit in ``checkpoint-<step>/``: see `checkpoint_files`) carries ``text2sql.json``:
the resolved hyperparameters and prompt format it was trained with. From it we rebuild the
exact test split (same sources, subset, split seed; the dataset cache makes this instant), load
the model -- base + LoRA adapter (safetensors), or the full fine-tuned weights -- and generate
for the adapter and, with the adapter disabled, for the base model, with the checkpoint's
``eval.decoding`` (or an override). Every prediction
is judged by execution in the sandbox.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.formatting import FormatPlan
from dataset_utils.hardness import HARDNESS_LEVELS
from dataset_utils.records import Example
from evaluation.generation import Generation, generate_sql
from evaluation.judge import EvalResult, GoldCache, score

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    hp: Any  # trainer.config.Hyperparameters
    plan: FormatPlan
    model: Any
    tokenizer: Any
    is_adapter: bool


@dataclass
class Comparison:
    examples: list[Example]
    generations: dict[str, Generation] = field(default_factory=dict)
    results: dict[str, EvalResult] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)  # DecodingArgs used, as a dict


MANIFEST = "text2sql.json"


def checkpoint_files(path: Path) -> Path:
    """The folder that holds a checkpoint's files, in either layout a checkpoint is stored in.

    - The local run store (``runs/<x>/trial-<n>/checkpoints/<uuid>/``) and a Trainer's own
      ``checkpoint-<step>/`` folder: the files (``text2sql.json``, weights, tokenizer) at the top.
    - Determined checkpoint storage, as `DetCallback` uploads the Trainer's output folder:
      ``<uuid>/checkpoint-<step>/...`` beside Determined's ``<uuid>/metadata.json``. That is
      also what ``text2sql mirror --experiment-id`` downloads.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    steps = sorted(p for p in path.glob("checkpoint-*") if (p / MANIFEST).is_file())
    if len(steps) == 1:
        return steps[0]
    if len(steps) > 1:
        raise UserError(
            f"{path} holds {len(steps)} checkpoints ({', '.join(p.name for p in steps)}); "
            "pass one of them"
        )
    raise UserError(
        f"{path} has no {MANIFEST} (at its top or in one checkpoint-<step>/ folder): not a "
        "checkpoint written by this trainer"
    )


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``text2sql.json`` (either layout, see `checkpoint_files`); a missing or
    damaged one is one `UserError` that names the file and what is wrong with it."""
    f = checkpoint_files(Path(ckpt)) / MANIFEST
    damaged = f"checkpoint manifest {f} is damaged"
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{damaged}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{damaged}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
            "restore it from the run that wrote the checkpoint or from another checkpoint of "
            "the same trial"
        ) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{damaged}: expected a JSON object, found {type(manifest).__name__}")
    for key in ("hyperparameters", "format_plan"):
        if not isinstance(manifest.get(key), dict):
            found = "missing" if key not in manifest else type(manifest[key]).__name__
            raise UserError(f"{damaged}: {key!r} must be an object, found {found}")
    return manifest


def load_checkpoint(ckpt: str | Path) -> LoadedCheckpoint:
    """Load tokenizer + model from a checkpoint folder (weights via safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import Hyperparameters, from_dict
    from trainer.modeling import load_model, torch_dtype

    ckpt = checkpoint_files(Path(ckpt))
    manifest = read_manifest(ckpt)
    try:
        hp = from_dict(Hyperparameters, manifest["hyperparameters"])
    except UserError as e:
        raise UserError(f"checkpoint manifest {ckpt / 'text2sql.json'} is damaged: {e}") from None
    try:
        plan = FormatPlan(**manifest["format_plan"])
    except TypeError as e:
        raise UserError(
            f"checkpoint manifest {ckpt / 'text2sql.json'} is damaged: format_plan: {e}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_adapter = (ckpt / "adapter_config.json").is_file()
    if is_adapter:
        if not (ckpt / "adapter_model.safetensors").is_file():
            raise UserError(f"{ckpt}: adapter weights must be adapter_model.safetensors")
        from peft import PeftModel

        # QLoRA adapters are applied to the base in its compute dtype, not 4-bit: 4-bit models
        # cannot be saved, and serving does not need them.
        base_args = hp.model
        if hp.method == "qlora" and hp.quantization is not None:
            base_args = _with_dtype(hp.model, hp.quantization.compute_dtype)
        base = load_model(base_args)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, ckpt)
    else:
        if not any(ckpt.glob("*.safetensors")):
            raise UserError(f"{ckpt}: full-model weights must be *.safetensors")
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch_dtype(hp.model.dtype), use_safetensors=True
        )
    model.eval()
    return LoadedCheckpoint(ckpt, manifest, hp, plan, model, tokenizer, is_adapter)


def _with_dtype(model_args: Any, dtype: str) -> Any:
    import dataclasses

    import torch

    return dataclasses.replace(model_args, dtype=dtype if torch.cuda.is_available() else "float32")


def test_examples(
    loaded: LoadedCheckpoint, limit: int | None = None, split: str = "test"
) -> list[Example]:
    """The held-out split the checkpoint was trained without (rebuilt from its manifest)."""
    from trainer.training_data import build_datasets

    data = build_datasets(loaded.hp, loaded.tokenizer)
    rows = data.examples[split]
    n = limit if limit is not None else loaded.hp.eval.test_samples
    return rows[:n] if n is not None else rows


def decoding_with(base: Any, overrides: dict[str, Any] | None) -> Any:
    """``base`` (a `trainer.config.DecodingArgs`) with ``overrides`` applied and checked."""
    if not overrides:
        return base
    from trainer.config import DecodingArgs, from_dict

    return from_dict(DecodingArgs, {**asdict(base), **overrides}, "decoding")


def load_base(loaded: LoadedCheckpoint) -> Any:
    from trainer.modeling import load_model

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
    from evaluation.curves import plot_curves
    from evaluation.report import write_report

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
