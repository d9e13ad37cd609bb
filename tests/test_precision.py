"""Precision on the GPU paths (issue 16, defect 7): validation generation in the training
precision, TF32 on Ampere and newer.

- Validation generation runs inside the Trainer's autocast: with bf16 over fp32 weights (the
  DDP full fine-tune) or fp32 LoRA adapters, the LM head computes in bf16 whichever engine
  decodes. accelerate puts autocast on the top module's forward only, which ``generate`` on a
  peft model bypasses (fp32 before the fix). CPU autocast runs the same code path as CUDA's.
- TF32: ``gpu_precision_args`` gives ``tf32`` to capability 8.0+ only (TrainingArguments
  refuses it elsewhere); on a CUDA machine ``build_training_args`` applies it (``gpu`` test).

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_precision.py``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.training import gpu_precision_args


def _tiny_lora() -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.parametrize("engine", ["generate", "forward"])
def test_validation_generation_runs_in_the_training_precision(tmp_path: Path, engine: str) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments

    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer

    seen: list[torch.dtype] = []

    def generation_metrics(model: Any) -> dict[str, float]:
        # What build_generation_metrics' engines call: model.generate (the `hf` engine, used
        # under ZeRO-3) or the model itself (the prefix-cached engine).
        head = model.get_base_model().get_output_embeddings()
        hook = head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        ids = torch.tensor([[5, 6, 7]])
        with torch.inference_mode():
            if engine == "generate":
                model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
            else:
                model(input_ids=ids)
        hook.remove()
        return {"execution_accuracy": 0.0}

    rows = [{"input_ids": [2, 3, 4, 5, 6, 7], "labels": [-100, -100, -100, 5, 6, 7]}] * 8
    data = Dataset.from_list(rows)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=True,  # autocast, as efficiency.bf16 gives on a GPU
        max_steps=1,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
    )
    trainer = Text2SqlTrainer(
        model=_tiny_lora(),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=CompletionCollator(0),
        generation_metrics=generation_metrics,
    )
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}, seen
    # The weights themselves stay fp32 (autocast, not a cast of the model).
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_tf32_on_ampere_and_newer_only() -> None:
    assert gpu_precision_args((8, 0)) == {"tf32": True}  # A100, A10G, L4 (8.9), RTX 30/40
    assert gpu_precision_args((9, 0)) == {"tf32": True}  # H100, H200
    assert gpu_precision_args((7, 5)) == {}  # T4: TrainingArguments refuses tf32
    assert gpu_precision_args((7, 0)) == {}  # V100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_build_training_args_turns_tf32_on(tmp_path: Path) -> None:
    from trainer.config import Hyperparameters
    from trainer.training import RunEnv, build_training_args

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs Ampere or newer")
    args = build_training_args(Hyperparameters(), RunEnv(output_dir=str(tmp_path)))
    assert args.tf32 is True
    assert torch.backends.fp32_precision == "tf32"
