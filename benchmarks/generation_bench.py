"""Greedy SQL generation: the prefix-cached batched engine vs one-at-a-time `model.generate`.

Loads SmolLM2-135M-Instruct (the embedded default, offline) and ``--prompts`` real Spider dev
questions (``../shared/data`` beside the checkout or ``$TEXT2SQL_DATA``), rendered exactly as
the trainer renders them (ChatML, compact schema), and decodes each greedily twice:

1. one at a time with ``model.generate`` (batch 1, KV cache on) -- the baseline;
2. with `evaluation.generation.generate_sql` (``engine="prefix"``): the schema prefix's KV
   cache computed once per database, batches mixing schemas, finished rows leaving the batch.

It prints both times, the speed-up, and whether every output is token-for-token identical.
Target (issue 5): identical outputs, speed-up >= 4x on 64 prompts on a 2-core CPU.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/generation_bench.py                # 64 prompts
    HF_HUB_OFFLINE=1 python benchmarks/generation_bench.py --prompts 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataset_utils.errors import UserError  # noqa: E402

TARGET_SPEEDUP = 4.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--schema-style", default="compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    import torch

    from dataset_utils.formatting import plan_format
    from dataset_utils.sources import SourceSpec, load_source
    from evaluation.generation import generate_sql
    from trainer.config import ModelArgs
    from trainer.modeling import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = SourceSpec(format="spider", split="dev", schema_style=args.schema_style)
        rows = load_source(spec).examples
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = random.Random(args.seed).sample(rows, min(args.prompts, len(rows)))
    model_args = ModelArgs(name_or_path="embedded:smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, attn_implementation="sdpa")
    plan = plan_format("chatml", tokenizer)
    n_schemas = len({e.context for e in examples})
    print(
        f"{len(examples)} Spider prompts over {n_schemas} schemas; greedy, "
        f"max_new_tokens={args.max_new_tokens}, torch threads={torch.get_num_threads()}"
    )

    common = dict(max_new_tokens=args.max_new_tokens, progress=True)
    start = time.perf_counter()
    one = generate_sql(
        model, tokenizer, examples, plan, batch_size=1, engine="hf", desc="one at a time", **common
    )
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    fast = generate_sql(
        model,
        tokenizer,
        examples,
        plan,
        batch_size=args.batch_size,
        engine="prefix",
        desc="prefix engine",
        **common,
    )
    t_fast = time.perf_counter() - start

    same = sum(a == b for a, b in zip(one.raw, fast.raw, strict=True))
    summary = {
        "prompts": len(examples),
        "schemas": n_schemas,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "one_at_a_time_s": round(t_one, 2),
        "prefix_engine_s": round(t_fast, 2),
        "speedup": round(t_one / t_fast, 2),
        "identical_outputs": same,
        "new_tokens": fast.new_tokens,
        "new_tokens_per_s_one": round(one.new_tokens / t_one, 1),
        "new_tokens_per_s_prefix": round(fast.new_tokens / t_fast, 1),
    }
    for i, (a, b) in enumerate(zip(one.raw, fast.raw, strict=True)):
        if a != b:
            print(f"differs #{i}:\n  one:    {a!r}\n  prefix: {b!r}")
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"one at a time: {t_one:.1f} s   prefix engine: {t_fast:.1f} s   "
        f"speed-up {t_one / t_fast:.2f}x (target >= {TARGET_SPEEDUP}x)   "
        f"identical: {same}/{len(examples)}"
    )
    return 0 if same == len(examples) and t_one / t_fast >= TARGET_SPEEDUP else 1


if __name__ == "__main__":
    raise SystemExit(main())
