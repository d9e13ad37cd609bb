"""Cost (and effect) of each `eval.decoding` option vs greedy, on real Spider dev prompts.

Loads a model (default: the embedded SmolLM2-135M-Instruct, offline; ``--model`` takes a
checkpoint folder or a Hub id; ``--tiny`` a 2-layer random model for a quick smoke run) and
``--prompts`` Spider dev questions rendered as the trainer renders them, then decodes them
with each option set (greedy; beam k; beam k + execution guidance; greedy + schema
constraint; beam k + both) and prints, per option: wall and CPU seconds, seconds per example,
the slowdown vs greedy, generated tokens/s (of the returned answers), executable SQL and
execution accuracy on those prompts (the judge of `evaluation.judge`).

The machine this runs on should be quiet: the figures are times.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/decoding_bench.py --prompts 8 --beams 4
    HF_HUB_OFFLINE=1 python benchmarks/decoding_bench.py --model runs/x/trial-1/checkpoints/<id>
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


def option_sets(k: int) -> list[tuple[str, dict[str, object]]]:
    return [
        ("greedy", {}),
        (f"beam {k}", {"num_beams": k}),
        (f"beam {k} + guided", {"num_beams": k, "execution_guided": True}),
        ("greedy + constrained", {"schema_constrained": True}),
        (
            f"beam {k} + guided + constrained",
            {"num_beams": k, "execution_guided": True, "schema_constrained": True},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--schema-style", default="compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--tiny", type=Path, default=None, help="use a tiny random model here")
    parser.add_argument("--only", default=None, help="comma-separated option names to run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    import torch

    from dataset_utils.formatting import plan_format
    from dataset_utils.sources import SourceSpec, load_source
    from evaluation.generation import generate_sql
    from evaluation.judge import score
    from evaluation.schema_constraint import token_texts
    from trainer.config import ModelArgs
    from trainer.modeling import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = load_source(SourceSpec(format="spider", schema_style=args.schema_style)).examples
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = random.Random(args.seed).sample(rows, min(args.prompts, len(rows)))
    if args.tiny is not None:
        from transformers import AutoModelForCausalLM

        from tests import tiny

        path = tiny.make_tiny_model(args.tiny)
        tokenizer = tiny.tokenizer()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    else:
        model_args = ModelArgs(name_or_path=args.model)
        tokenizer = load_tokenizer(model_args)
        model = load_model(model_args, attn_implementation="sdpa")
    model.eval()
    plan = plan_format("chatml", tokenizer)
    t0 = time.perf_counter()
    token_texts(tokenizer)  # built once per process; reported apart
    vocab_s = time.perf_counter() - t0
    print(
        f"{len(examples)} Spider dev prompts over {len({e.db_id for e in examples})} databases; "
        f"max_new_tokens={args.max_new_tokens}, torch threads={torch.get_num_threads()}; "
        f"constraint vocabulary built in {vocab_s:.1f} s (once per process)"
    )
    wanted = set(args.only.split(",")) if args.only else None
    results = []
    base_s = None
    for name, options in option_sets(args.beams):
        if wanted is not None and name not in wanted:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        gen = generate_sql(
            model,
            tokenizer,
            examples,
            plan,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=False,
            **options,  # type: ignore[arg-type]
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        base_s = wall if base_s is None else base_s
        res = score(examples, gen.sql).overall
        lower = sum(1 for c in gen.chosen or [] if c > 0)
        row = {
            "option": name,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "s_per_example": round(wall / len(examples), 3),
            "x_greedy": round(wall / base_s, 2),
            "tokens_per_s": round(gen.new_tokens / wall, 1),
            "executable": round(res.executable_rate, 3),
            "exec_accuracy": round(res.exec_accuracy, 3),
            "guided_took_lower_beam": lower,
        }
        results.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"vocab_s": vocab_s, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
