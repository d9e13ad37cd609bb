"""Training throughput: the seed recipes against this project's default path, side by side.

One run, one data set, one model. The data are the real Spider dev rows (``../shared/data``
beside the checkout, or ``$TEXT2SQL_DATA``) with their SQLite schemas rendered in the project's
default ``compact`` style and the ``chatml`` format (`dataset_utils.sources` +
`dataset_utils.formatting`, as `prepare_data` does); the longest prompts run to ~770 tokens.
The model is SmolLM2-135M-Instruct (the embedded default, `trainer.modeling`). Each recipe is
trained with LoRA (r 16, all-linear) and as a full fine-tune:

  (a) ``mlflow``      -- the MLflow QLoRA tutorial recipe: every row padded to 256 tokens
                         (longer rows truncated), loss on every token, fp32, HF `Trainer`.
  (b) ``determined``  -- the Determined recipe: dynamic padding per (random) batch,
                         completion-only loss, fp32, HF `Trainer`.
  (c) ``project``     -- this project's default path, built by the trainer's own code
                         (`trainer.modeling.build_model` / `trainer.training.build_training_args`,
                         `trainer.hf_trainer.CompletionCollator` / `Text2SqlTrainer`):
                         shared-prefix batches from `PrefixGroupedSampler`, logits only at
                         completion positions, bf16 ``auto``, activation checkpointing ``auto``.
  (t) ``trl``         -- trl's `SFTTrainer` (``--recipes a,b,c,t``; trl is in the dev extra) on
                         the same rows as (b): completion-only loss, per-batch padding (its
                         padding-free mode needs FlashAttention, CUDA only), its chunked LM
                         head, fp32. Why the trainer is not built on it: benchmarks/README.md.

The timed batches hold exactly the same examples in every recipe: the project's sampler picks
``warmup + steps`` batches from all 972 rows; (a) and (b) get the same rows shuffled into random
batches (their recipes' sampler), warm-up rows and timed rows kept apart. Every configuration
runs in a fresh subprocess, so its peak RSS is its own.

Columns (see benchmarks/README.md for the FLOP counts):
  useful tok/s   non-pad tokens of the examples per second. (a): tokens left after truncation
                 to 256; (b), (c): every token of every example. With prefix sharing the schema
                 is computed once per batch but counts for every example it serves -- each
                 example's loss is exactly that of running it alone (tests/test_prefix_sharing.py).
  computed tok/s non-pad positions actually run through the network per second.
  compl tok/s    answer (SQL) tokens trained per second ((a): those that survived truncation).
  step s         mean wall time of a timed optimizer step.
  peak RSS       the subprocess's peak resident memory (model load included).
  MFU            model FLOPs of the non-pad work done / time / matmul peak measured in this run.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/train_bench.py            # ~10-15 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/train_bench.py --quick    # smoke run, ~4 min
    HF_HUB_OFFLINE=1 python benchmarks/train_bench.py --out /tmp/bench --steps 6

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results/``) and
prints the table, then the ratios (c)/(a) and (c)/(b).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script from anywhere: make the repository's packages importable.
    sys.path.insert(0, str(REPO_ROOT))

from dataset_utils.errors import UserError  # noqa: E402
from dataset_utils.formatting import IGNORE_INDEX  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
RECIPES = {
    "a": "mlflow: pad 256, all-token loss, fp32",
    "b": "determined: dynamic pad, completion loss, fp32",
    "c": "project default",
    "t": "trl SFTTrainer: dynamic pad, completion loss, fp32",
}
DEFAULT_RECIPES = "a,b,c"  # (t) needs trl (the dev extra): --recipes a,b,c,t
METHODS = ("lora", "full")
FIXED_LENGTH = 256  # the MLflow QLoRA tutorial's max_length (padding="max_length", truncation)
RSS_LIMIT_GB = 8.0


# --------------------------------------------------------------------------------------------
# Matmul peak.


def matmul_peak(dtype_name: str, n: int, min_seconds: float) -> float:
    """GFLOP/s of ``torch.matmul`` on two n x n matrices (best of repeated calls)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up (thread pool, packing buffers)
    best = float("inf")
    spent = 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
    return 2 * n**3 / best / 1e9


# --------------------------------------------------------------------------------------------
# Data.


def load_rows(
    spider_dir: Path | None, model: str = MODEL
) -> tuple[list[dict[str, Any]], list[str]]:
    """Tokenized Spider dev rows (input_ids, labels, prefix_len) and each row's db id."""
    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.sources import SourceSpec, load_source
    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    spec = SourceSpec(
        format="spider",
        path=str(spider_dir) if spider_dir else None,
        split="validation",
        schema_style="compact",
    )
    examples = load_source(spec).examples
    tok = load_tokenizer(ModelArgs(name_or_path=model))
    t = tokenize_examples(examples, tok, plan_format("chatml", tok), None)
    rows = [
        {"input_ids": i, "labels": lab, "prefix_len": p}
        for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)
    ]
    return rows, [examples[k].db_id or "" for k in t.kept]


def choose_batches(
    rows: list[dict[str, Any]], batch_size: int, warmup: int, steps: int, seed: int
) -> dict[str, list[list[int]]]:
    """Row indices per batch for each recipe; timed batches hold the same rows everywhere."""
    from trainer.hf_trainer import PrefixGroupedSampler

    # The same key Text2SqlTrainer gives the sampler: the ids of the shared (schema) prefix.
    keys = [hash(tuple(r["input_ids"][: r["prefix_len"]])) for r in rows]
    order = list(PrefixGroupedSampler(keys, batch_size, seed=seed))
    n = (warmup + steps) * batch_size
    if n > len(order):
        raise UserError(
            f"{warmup + steps} batches of {batch_size} need {n} rows, have {len(order)}"
        )
    project = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(seed)
    warm_rows = [i for b in project[:warmup] for i in b]
    timed_rows = [i for b in project[warmup:] for i in b]
    rng.shuffle(warm_rows)
    rng.shuffle(timed_rows)
    shuffled = warm_rows + timed_rows
    random_batches = [shuffled[i : i + batch_size] for i in range(0, n, batch_size)]
    return {"a": random_batches, "b": random_batches, "c": project, "t": random_batches}


# --------------------------------------------------------------------------------------------
# The recipes' collators ((c) uses the trainer's own CompletionCollator).


class FixedLengthCollator:
    """MLflow tutorial: truncate and pad every row to ``length``; labels = every real token."""

    def __init__(self, pad_token_id: int, length: int = FIXED_LENGTH):
        self.pad_token_id = pad_token_id
        self.length = length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        b = len(rows)
        input_ids = torch.full((b, self.length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, self.length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = r["input_ids"][: self.length]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        # The tutorial's DataCollatorForLanguageModeling masks pad ids; SmolLM2's pad id is its
        # <|im_end|>, so mask by position instead (real <|im_end|> tokens stay trained).
        labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_stats(recipe: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Token counts of one batch as the recipe processes it."""
    n_completion = [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows]
    lengths = [len(r["input_ids"]) for r in rows]
    if recipe == "a":
        kept = [min(n, FIXED_LENGTH) for n in lengths]
        # Completion tokens that survived the cut (the completion is the tail of each row).
        compl = [max(0, c - (n - k)) for c, n, k in zip(n_completion, lengths, kept, strict=True)]
        return {
            "useful_tokens": sum(kept),
            "computed_tokens": sum(kept),
            "positions": len(rows) * FIXED_LENGTH,
            "completion_tokens": sum(compl),
            "head_positions": sum(kept),
            "truncated": sum(1 for n in lengths if n > FIXED_LENGTH),
            "answer_lost": sum(
                1 for c, n in zip(n_completion, lengths, strict=True) if n - c >= FIXED_LENGTH
            ),
        }
    if recipe in ("b", "t"):  # (t): trl's fused LM head still runs at every position
        return {
            "useful_tokens": sum(lengths),
            "computed_tokens": sum(lengths),
            "positions": len(rows) * max(lengths),
            "completion_tokens": sum(n_completion),
            "head_positions": sum(lengths),
            "truncated": 0,
            "answer_lost": 0,
        }
    # (c): rows sharing a prefix share one copy of it, then each row's own tokens ("positions"
    # is replaced by what the collator builds, in `run_worker`).
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in rows:
        p = int(r["prefix_len"])
        groups.setdefault(tuple(r["input_ids"][:p]), []).append(len(r["input_ids"]) - p)
    seqs = [len(p) + sum(rest) for p, rest in groups.items()]
    return {
        "useful_tokens": sum(lengths),
        "computed_tokens": sum(seqs),
        "positions": len(seqs) * max(seqs),
        "completion_tokens": sum(n_completion),
        # logits_to_keep: the LM head runs only where the next token is trained.
        "head_positions": sum(n_completion),
        "truncated": 0,
        "answer_lost": 0,
    }


# --------------------------------------------------------------------------------------------
# One configuration, in its own process.


def _flops_per_token(model: Any, method: str) -> dict[str, float]:
    """Matmul parameter counts and the FLOPs charged per position (see README)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    n_head = head.weight.numel()
    n_body = 0
    n_adapter = 0
    for name, module in base.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear):
            continue
        if "lora_" in name:
            n_adapter += module.weight.numel()
        else:
            n_body += module.weight.numel()
    if method == "full":
        body, head_f = 6.0 * n_body, 6.0 * n_head
    else:  # frozen base: forward + input gradient; adapters: forward + both gradients
        body, head_f = 4.0 * n_body + 6.0 * n_adapter, 4.0 * n_head
    return {
        "n_body": n_body,
        "n_head": n_head,
        "n_adapter": n_adapter,
        "flops_per_body_token": body,
        "flops_per_head_position": head_f,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.config import Hyperparameters, LoraArgs, ModelArgs
    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer
    from trainer.modeling import apply_adapter, build_model, load_model, load_tokenizer, peft_config
    from trainer.training import RunEnv, build_training_args

    recipe, method = spec["recipe"], spec["method"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    batches: list[list[dict[str, Any]]] = spec["batches"]
    warmup, bs = spec["warmup"], len(batches[0])
    out_dir = tempfile.mkdtemp(prefix="train-bench-")
    common = {
        "max_steps": len(batches),
        "per_device_train_batch_size": bs,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "logging_steps": 10**6,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 42,
    }
    torch.manual_seed(42)
    model_args = ModelArgs(name_or_path=spec.get("model", MODEL))
    tok = load_tokenizer(model_args)
    t_load = time.perf_counter()
    if recipe == "c":
        hp = Hyperparameters(model=model_args, method=method, training_args=dict(common))
        args = build_training_args(hp, RunEnv(output_dir=out_dir, progress=False))
        model = build_model(hp, tok)
        eff = hp.efficiency
        collator: Any = CompletionCollator(
            tok.pad_token_id, packing=eff.packing, prefix_sharing=eff.prefix_sharing
        )
        trainer_cls: Any = Text2SqlTrainer
        extra: dict[str, Any] = {
            "checkpointing_min_tokens": (
                eff.checkpointing_min_tokens if eff.activation_checkpointing == "auto" else None
            )
        }
        settings = {
            "bf16": bool(args.bf16),
            "prefix_sharing": eff.prefix_sharing,
            "packing": eff.packing,
            "activation_checkpointing": eff.activation_checkpointing,
            "checkpointing_min_tokens": eff.checkpointing_min_tokens,
        }
    else:
        # (a), (b), (t): the seed setups, one fp32 model and the same plain arguments.
        plain: dict[str, Any] = {
            "output_dir": out_dir,
            "use_cpu": not torch.cuda.is_available(),
            "bf16": False,
            "report_to": "none",
            "disable_tqdm": True,
            **common,
        }
        model = load_model(ModelArgs(name_or_path=model_args.name_or_path, dtype="float32"))
        lora = LoraArgs() if method == "lora" else None
        model = apply_adapter(model, peft_config(method, lora), activation_checkpointing=False)
        settings = {"bf16": False, "prefix_sharing": False, "packing": False}
        extra = {}
        if recipe == "t":
            # trl's SFTTrainer as its docs set it up for a prompt-completion dataset, on the
            # same tokenized rows: `labels` already hold -100 outside the completion (what trl
            # builds from `completion_mask`), so trl keeps them. Its defaults that differ here
            # are set as (b) has them: fp32 (SFTConfig defaults to bf16, 100x slower on this
            # CPU), no truncation (max_length=None; (b) and (c) train every token).
            # padding_free stays off: trl supports it only with FlashAttention 2/3 (CUDA), so
            # on CPU SFTTrainer pads per batch like (b), and computes log-probs at every
            # position with its chunked LM head.
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(**plain, max_length=None, padding_free=False)
            collator = None  # trl's own DataCollatorForLanguageModeling
            trainer_cls = SFTTrainer
            settings["trl"] = True
        else:
            args = TrainingArguments(**plain, remove_unused_columns=False)
            collator = (
                FixedLengthCollator(tok.pad_token_id)
                if recipe == "a"
                else CompletionCollator(tok.pad_token_id)
            )
            trainer_cls = Trainer
    load_s = time.perf_counter() - t_load

    class InOrder(trainer_cls):  # type: ignore[misc, valid-type]
        """The batches were chosen by the parent; keep them as they are."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            ds = train_dataset if train_dataset is not None else self.train_dataset
            return torch.utils.data.SequentialSampler(ds)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []  # this process's CPU time (all its threads)

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    rows = [r for b in batches for r in b]
    if recipe == "t":
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    dataset = datasets.Dataset.from_list(rows)
    timer = StepTimer()
    collator_kw = {} if collator is None else {"data_collator": collator}
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=dataset,
        **collator_kw,
        processing_class=tok,
        callbacks=[timer],
        **extra,
    )
    try:
        result = trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    timed = step_s[warmup:]
    cpu_s = [b - a for a, b in zip(timer.cpu_marks, timer.cpu_marks[1:], strict=False)][warmup:]
    stats = [batch_stats(recipe, b) for b in batches[warmup:]]
    if recipe == "c":
        # Positions as the trainer's collator lays the batch out (padding included, if any).
        for st, b in zip(stats, batches[warmup:], strict=True):
            st["positions"] = int(collator(b)["input_ids"].numel())
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    flops = _flops_per_token(model, method)
    model_flops = (
        flops["flops_per_body_token"] * total["computed_tokens"]
        + flops["flops_per_head_position"] * total["head_positions"]
    )
    seconds = sum(timed)
    # Text2SqlTrainer recomputes activations only for batches over this many positions.
    threshold = extra.get("checkpointing_min_tokens")
    ckpt_on = threshold is not None and any(s["positions"] > threshold for s in stats)
    return {
        "recipe": recipe,
        "method": method,
        "label": spec.get("label", f"{recipe}-{method}"),
        "settings": settings,
        "load_s": load_s,
        "steps": len(timed),
        "warmup_steps": warmup,
        "batch_size": bs,
        "step_s": timed,
        "mean_step_s": seconds / len(timed),
        # CPU seconds per step: on a shared machine, with --threads 1, a load-independent
        # measure of the work done (wall time there mostly measures the other processes).
        "cpu_step_s": cpu_s,
        "mean_cpu_step_s": sum(cpu_s) / len(cpu_s),
        "threads": torch.get_num_threads(),
        "train_loss": result.training_loss,
        "tokens": total,
        "useful_tokens_per_s": total["useful_tokens"] / seconds,
        "computed_tokens_per_s": total["computed_tokens"] / seconds,
        "completion_tokens_per_s": total["completion_tokens"] / seconds,
        "padding_share": 1 - total["computed_tokens"] / total["positions"],
        "model_flops": model_flops,
        "achieved_gflops": model_flops / seconds / 1e9,
        "flop_counts": flops,
        "activation_checkpointing_used": ckpt_on,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_experiment_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """A few steps of a real experiment's job, built by the trainer's own code from its YAML:
    its data (train split, tokenized, from the cache), model, collator, sampler and trainer."""
    import torch
    from transformers import TrainerCallback

    from trainer.experiment import load_experiment
    from trainer.modeling import build_model, load_tokenizer
    from trainer.training import RunEnv, build_trainer, build_training_args
    from trainer.training_data import build_datasets

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    warmup, steps = spec["warmup"], spec["steps"]
    hp = load_experiment(spec["experiment"], schema=False).hparams
    hp.training_args.update(
        max_steps=warmup + steps,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        report_to="none",
    )
    out_dir = tempfile.mkdtemp(prefix="train-bench-exp-")
    env = RunEnv(output_dir=out_dir, progress=False)
    tok = load_tokenizer(hp.model)
    data = build_datasets(hp, tok)
    args = build_training_args(hp, env)
    model = build_model(hp, tok)

    marks: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append((time.perf_counter(), time.process_time()))

    env.callbacks.append(StepTimer())
    trainer = build_trainer(hp, model, tok, data, args, env)
    collate = trainer.data_collator
    shapes: list[tuple[int, int]] = []

    def recording(rows: Any) -> Any:
        batch = collate(rows)
        shapes.append((len(rows), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = recording
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)][warmup:]
    timed = shapes[warmup : warmup + steps]
    return {
        "label": spec["label"],
        "experiment": str(spec["experiment"]),
        "steps": len(wall),
        "warmup_steps": warmup,
        "threads": torch.get_num_threads(),
        "step_s": wall,
        "cpu_step_s": cpu,
        "mean_step_s": sum(wall) / len(wall),
        "mean_cpu_step_s": sum(cpu) / len(cpu),
        "rows": sum(r for r, _ in timed),
        "positions": sum(n for _, n in timed),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def experiment_markdown(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['label']}: ERROR {r['error'].splitlines()[-1][:120]}\n"
    return (
        f"| experiment job: {r['experiment']} | steps | rows | positions | step s | CPU s/step "
        "| peak RSS GB |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {r['threads']} thread(s), after {r['warmup_steps']} warm-up steps | {r['steps']} "
        f"| {r['rows']} | {r['positions']} | {r['mean_step_s']:.2f} "
        f"| {r['mean_cpu_step_s']:.2f} | {r['peak_rss_gb']:.2f} |\n"
    )


def spawn(spec: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its peak RSS is its own."""
    spec_path = workdir / f"{spec['label']}.spec.json"
    out_path = workdir / f"{spec['label']}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"label": spec["label"], "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"label": spec["label"], "error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# Report.


def _mfu(r: dict[str, Any], peaks: dict[str, float]) -> tuple[float, float]:
    return r["achieved_gflops"] / peaks["float32"], r["achieved_gflops"] / peaks["bfloat16"]


def markdown(results: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    head = (
        "| method | recipe | useful tok/s | computed tok/s | compl tok/s | step s | pad % "
        "| peak RSS GB | GFLOP/s | MFU fp32 | MFU bf16 | truncated | answer lost |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | ERROR | {r['error'].splitlines()[-1][:80]} |")
            continue
        m32, m16 = _mfu(r, peaks)
        t = r["tokens"]
        lines.append(
            f"| {r['method']} | ({r['recipe']}) {RECIPES[r['recipe']]} "
            f"| {r['useful_tokens_per_s']:.0f} | {r['computed_tokens_per_s']:.0f} "
            f"| {r['completion_tokens_per_s']:.1f} | {r['mean_step_s']:.2f} "
            f"| {100 * r['padding_share']:.0f} | {r['peak_rss_gb']:.2f} "
            f"| {r['achieved_gflops']:.1f} | {100 * m32:.0f}% | {100 * m16:.0f}% "
            f"| {t['truncated']} | {t['answer_lost']} |"
        )
    return head + "\n".join(lines) + "\n"


def memory_markdown(mem: list[dict[str, Any]]) -> str:
    out = [
        "| memory point: (c) LoRA, batch of 8 | schemas | tokens (examples) | computed "
        "| peak RSS GB | <= 8 GB | step s | computed tok/s | CPU s/step | computed tok/CPU s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in mem:
        if "error" in r:
            out.append(f"| {r['label']} | ERROR {r['error'].splitlines()[-1][:80]} |")
            continue
        ok = "yes" if r["peak_rss_gb"] <= RSS_LIMIT_GB else "**NO**"
        out.append(
            f"| {r['label']} (longest row {r['longest_row']}) | {r['schemas']} "
            f"| {r['tokens']['useful_tokens']} | {r['tokens']['computed_tokens']} "
            f"| {r['peak_rss_gb']:.2f} | {ok} | {r['mean_step_s']:.1f} "
            f"| {r['computed_tokens_per_s']:.0f} | {r['mean_cpu_step_s']:.1f} "
            f"| {_per_cpu_s(r):.0f} |"
        )
    ok = {r["label"]: r for r in mem if "error" not in r}
    if {"longest-8", "longest-8-distinct"} <= ok.keys():
        d, sh = ok["longest-8-distinct"], ok["longest-8"]
        wall = d["computed_tokens_per_s"] / sh["computed_tokens_per_s"]
        cpu = _per_cpu_s(d) / _per_cpu_s(sh)
        out.append(
            f"\nPer computed token, distinct schemas run at {100 * wall:.0f}% of the shared "
            f"schema's speed (wall time; {100 * cpu:.0f}% by CPU time)."
        )
    return "\n".join(out) + "\n"


def _per_cpu_s(r: dict[str, Any]) -> float:
    return r["tokens"]["computed_tokens"] / (r["mean_cpu_step_s"] * r["steps"])


def scaling_markdown(scaling: list[dict[str, Any]]) -> str:
    out = [
        "| batch scaling: (c) LoRA, the same rows | batch | steps | step s | s / example "
        "| CPU s / example | computed tokens / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in scaling:
        if "error" in r:
            out.append(f"| {r['label']} | ERROR {r['error'].splitlines()[-1][:80]} |")
            continue
        per = r["mean_step_s"] / r["batch_size"]
        out.append(
            f"| {r['label']} | {r['batch_size']} | {r['steps']} | {r['mean_step_s']:.2f} "
            f"| {per:.3f} | {r['mean_cpu_step_s'] / r['batch_size']:.3f} "
            f"| {r['tokens']['computed_tokens'] / r['steps']:.0f} |"
        )
    ok = [r for r in scaling if "error" not in r]
    if len(ok) == 2:
        small, big = sorted(ok, key=lambda r: r["batch_size"])
        ratio = (big["mean_step_s"] / big["batch_size"]) / (
            small["mean_step_s"] / small["batch_size"]
        )
        cpu = (big["mean_cpu_step_s"] / big["batch_size"]) / (
            small["mean_cpu_step_s"] / small["batch_size"]
        )
        out.append(
            f"\nPer example, batch {big['batch_size']} costs {ratio:.2f}x batch "
            f"{small['batch_size']} (wall time; {cpu:.2f}x by CPU time)."
        )
    return "\n".join(out) + "\n"


def ratios(results: list[dict[str, Any]]) -> list[str]:
    by = {(r["recipe"], r["method"]): r for r in results if "error" not in r}
    out = []
    for method in METHODS:
        c = by.get(("c", method))
        if c is None:
            continue
        for other in ("a", "b", "t"):
            o = by.get((other, method))
            if o is None:
                continue
            out.append(
                f"{method}: useful tokens/s (c)/({other}) = "
                f"{c['useful_tokens_per_s'] / o['useful_tokens_per_s']:.2f}x; "
                f"completion tokens/s (c)/({other}) = "
                f"{c['completion_tokens_per_s'] / o['completion_tokens_per_s']:.2f}x"
            )
    return out


# --------------------------------------------------------------------------------------------
# Entry point.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_bench.py",
        description="Seed recipes (a) MLflow, (b) Determined vs (c) this project's default "
        "training path: LoRA and full fine-tune of SmolLM2-135M on real Spider dev rows.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 warm-up + 2 timed steps, one memory point",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seed", type=int, default=42, help="batch selection seed (default 42)")
    p.add_argument("--methods", default="lora,full", help="comma list of lora,full")
    p.add_argument(
        "--recipes",
        default=DEFAULT_RECIPES,
        help="comma list of the recipes to time: a, b, c, and t (trl's SFTTrainer; needs trl, "
        "in the dev extra). Default a,b,c; empty: none, e.g. to run only the memory points or "
        "--batch-scaling",
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=1,
        help="timed steps per memory point, after --memory-warmup (default 1)",
    )
    p.add_argument(
        "--memory-warmup",
        type=int,
        default=0,
        help="untimed steps per memory point on the same batch first (default 0)",
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the memory points (longest-8 ...)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per configuration (default: torch's); 1 with the CPU-time columns "
        "gives figures a busy machine does not distort",
    )
    p.add_argument(
        "--batch-scaling",
        type=int,
        default=None,
        metavar="B",
        help="also time (c) LoRA on the same rows as batches of B (chosen by the project's "
        "sampler) and as each of them cut in two, and report seconds per example",
    )
    p.add_argument(
        "--experiment",
        type=Path,
        default=None,
        metavar="YAML",
        help="also time --warmup + --steps steps of this experiment's own job (its data, "
        "model, sampler and settings, built by the trainer's own code), e.g. "
        "experiments/smollm2-135m-lora-cpu.yaml",
    )
    p.add_argument(
        "--spider",
        type=Path,
        default=None,
        metavar="DIR",
        help="Spider folder (default: <local data dir>/spider_dev)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results",
        help="where results.json and results.md go (default benchmarks/results/)",
    )
    p.add_argument(
        "--model",
        default=MODEL,
        help="model to train (default: the embedded SmolLM2-135M-Instruct; a local folder with "
        "the same tokenizer, e.g. a tiny test model, for a smoke run)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds one configuration may take before it is reported as failed (default 900)",
    )
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.steps = ns.steps or (2 if ns.quick else 4)
    ns.warmup = ns.warmup if ns.warmup is not None else 1
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    ns.methods = methods
    recipes = [r.strip() for r in ns.recipes.split(",") if r.strip()]
    if any(r not in RECIPES for r in recipes):
        p.error(f"--recipes: choose from {', '.join(RECIPES)}")
    ns.recipes = recipes
    if ns.memory_steps <= 0 or ns.memory_warmup < 0:
        p.error("--memory-steps must be positive, --memory-warmup >= 0")
    if ns.batch_scaling is not None and (ns.batch_scaling < 2 or ns.batch_scaling % 2):
        p.error("--batch-scaling: an even batch size >= 2")
    if ns.steps <= 0 or ns.warmup < 0 or ns.batch_size <= 0:
        p.error("--steps and --batch-size must be positive, --warmup >= 0")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.worker:
        spec = json.loads(Path(ns.worker[0]).read_text())
        run = run_experiment_worker if "experiment" in spec else run_worker
        Path(ns.worker[1]).write_text(json.dumps(run(spec)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    try:
        import torch

        from dataset_utils.settings import shared_data_dir

        spider = ns.spider
        if spider is None:
            base = shared_data_dir()
            if base is None or not (base / "spider_dev").is_dir():
                raise UserError("no Spider dev folder; pass --spider DIR or set TEXT2SQL_DATA")
            spider = base / "spider_dev"
        load_before = os.getloadavg()
        print("matmul peak ...", flush=True)
        peaks = {"float32": matmul_peak("float32", 2048, 1.0)}
        # bf16 can be 100x slower than fp32 on CPUs without AVX512-BF16/AMX: smaller matrices.
        from trainer.modeling import cpu_bf16_is_fast

        fast_bf16 = torch.cuda.is_available() or cpu_bf16_is_fast()
        peaks["bfloat16"] = matmul_peak("bfloat16", 2048 if fast_bf16 else 512, 0.5)
        print(
            f"  fp32 {peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.2f} GFLOP/s",
            flush=True,
        )
        rows, dbs = load_rows(spider, ns.model)
        plan = choose_batches(rows, ns.batch_size, ns.warmup, ns.steps, ns.seed)

        def materialize(idx: list[list[int]]) -> list[list[dict[str, Any]]]:
            return [[rows[i] for i in b] for b in idx]

        ns.out.mkdir(parents=True, exist_ok=True)
        results: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            for method in ns.methods:
                for recipe in ns.recipes:
                    label = f"{recipe}-{method}"
                    print(f"{label}: {RECIPES[recipe]} ...", flush=True)
                    spec = {
                        "recipe": recipe,
                        "method": method,
                        "label": label,
                        "warmup": ns.warmup,
                        "model": ns.model,
                        "threads": ns.threads,
                        "batches": materialize(plan[recipe]),
                    }
                    r = spawn(spec, Path(tmp), timeout_s=ns.timeout)
                    results.append(r)
                    if "error" in r:
                        print(f"  FAILED: {r['error']}", flush=True)
                    else:
                        print(
                            f"  {r['mean_step_s']:.2f} s/step, {r['useful_tokens_per_s']:.0f} "
                            f"useful tok/s, peak RSS {r['peak_rss_gb']:.2f} GB",
                            flush=True,
                        )
            # Memory point: (c) LoRA on the longest real rows. "longest-8": the 8 longest rows
            # (the sampler would batch them by schema; here they go in as one batch, whatever
            # their schemas). "longest-8-distinct": the longest row of 8 different schemas, so
            # nothing is shared -- the worst batch of 8 this data can produce.
            by_len = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
            mem_sets = {} if ns.no_memory else {"longest-8": by_len[: ns.batch_size]}
            if not ns.quick and not ns.no_memory:
                seen: set[str] = set()
                distinct = []
                for i in by_len:
                    if dbs[i] not in seen:
                        seen.add(dbs[i])
                        distinct.append(i)
                mem_sets["longest-8-distinct"] = distinct[: ns.batch_size]
            memory: list[dict[str, Any]] = []
            for name, idx in mem_sets.items():
                print(f"memory point {name} ...", flush=True)
                spec = {
                    "recipe": "c",
                    "method": "lora",
                    "label": f"memory-{name}",
                    "warmup": ns.memory_warmup,
                    "model": ns.model,
                    "threads": ns.threads,
                    "batches": materialize([idx] * (ns.memory_warmup + ns.memory_steps)),
                }
                r = spawn(spec, Path(tmp), timeout_s=ns.timeout)
                r["label"] = name
                r["longest_row"] = max(len(rows[i]["input_ids"]) for i in idx)
                r["schemas"] = len({dbs[i] for i in idx})
                memory.append(r)
                if "error" not in r:
                    print(f"  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
            # Batch scaling: the same rows as batches of B (the project's sampler) and as
            # each of those cut in two (rows of one schema stay together: the sampler's
            # batches are grouped by schema).
            scaling: list[dict[str, Any]] = []
            if ns.batch_scaling:
                big = choose_batches(rows, ns.batch_scaling, ns.warmup, ns.steps, ns.seed + 1)["c"]
                half = ns.batch_scaling // 2
                small = [part for b in big for part in (b[:half], b[half:])]
                for size, batches, warm in (
                    (half, small, 2 * ns.warmup),
                    (ns.batch_scaling, big, ns.warmup),
                ):
                    print(f"batch scaling: (c) LoRA, batches of {size} ...", flush=True)
                    spec = {
                        "recipe": "c",
                        "method": "lora",
                        "label": f"scaling-{size}",
                        "warmup": warm,
                        "model": ns.model,
                        "threads": ns.threads,
                        "batches": materialize(batches),
                    }
                    r = spawn(spec, Path(tmp), timeout_s=ns.timeout)
                    r["label"] = f"batches of {size}"
                    scaling.append(r)
                    if "error" not in r:
                        print(f"  {r['mean_step_s']:.2f} s/step", flush=True)
            experiment: dict[str, Any] | None = None
            if ns.experiment is not None:
                print(f"experiment job {ns.experiment} ...", flush=True)
                spec = {
                    "label": "experiment",
                    "experiment": str(ns.experiment.resolve()),
                    "warmup": ns.warmup,
                    "steps": ns.steps,
                    "threads": ns.threads,
                }
                experiment = spawn(spec, Path(tmp), timeout_s=ns.timeout)
                if "error" not in experiment:
                    print(f"  {experiment['mean_step_s']:.2f} s/step", flush=True)
        peaks_after = {"float32": matmul_peak("float32", 2048, 1.0)}
        peaks["float32"] = max(peaks["float32"], peaks_after["float32"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    a_rows = [r for r in results if r.get("recipe") == "a" and "error" not in r]
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "nice": os.nice(0),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
    }
    summary = {
        "model": ns.model,
        "data": str(spider),
        "rows": len(rows),
        "batch_size": ns.batch_size,
        "warmup_steps": ns.warmup,
        "timed_steps": ns.steps,
        "matmul_peak_gflops": peaks,
        "environment": env,
        "results": results,
        "memory": memory,
        "batch_scaling": scaling,
        "experiment": experiment,
        "ratios": ratios(results),
    }
    table = markdown(results, peaks)
    mem_table = memory_markdown(memory) if memory else ""
    scaling_table = scaling_markdown(scaling) if scaling else ""
    if experiment is not None:
        scaling_table += ("\n" if scaling_table else "") + experiment_markdown(experiment)
    truncated_total = sum(1 for r in rows if len(r["input_ids"]) > FIXED_LENGTH)
    notes = [
        f"Matmul peak (torch.matmul, square): fp32 {peaks['float32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.2f} GFLOP/s; {env['threads']} threads, nice {env['nice']}, "
        f"load average {load_before[0]:.2f} before / {env['loadavg_after'][0]:.2f} after.",
        f"{ns.warmup} warm-up + {ns.steps} timed steps of {ns.batch_size} rows per config; "
        f"{len(rows)} Spider dev rows, {truncated_total} of them longer than {FIXED_LENGTH} "
        "tokens (truncated by recipe (a)).",
    ]
    if a_rows:
        notes.append(
            "Recipe (a) in the timed batches: "
            + "; ".join(
                f"{r['method']}: {r['tokens']['truncated']} of {r['steps'] * r['batch_size']} "
                f"rows truncated, {r['tokens']['answer_lost']} lost their whole answer"
                for r in a_rows
            )
        )
    md = (
        "# Training throughput: seed recipes vs this project's default\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\n"
        + table
        + "\n"
        + mem_table
        + "\n"
        + scaling_table
        + ("\n" if scaling_table else "")
        + "\n".join(f"- {x}" for x in summary["ratios"])
        + "\n"
    )
    (ns.out / "results.json").write_text(json.dumps(summary, indent=2))
    (ns.out / "results.md").write_text(md)
    print()
    print("\n".join(notes))
    print()
    print(table)
    print(mem_table)
    if scaling_table:
        print(scaling_table)
    print(f"written: {ns.out / 'results.json'}, {ns.out / 'results.md'} ({env['wall_s']:.0f} s)")
    for line in summary["ratios"]:
        print(line)
    done = results + memory + scaling + ([experiment] if experiment else [])
    return 0 if all("error" not in r for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
