"""``efficiency.liger_kernel`` with the trainer's completion-only loss (issue 16, defect 1).

Liger replaces the causal LM's forward with its own, which slices
``hidden_states[:, logits_to_keep, :]``: an int or 1-D positions, not the 2-D boolean mask the
trainer passes to transformers (IndexError on the first forward, before the fix). On a GPU the
trainer lets Liger's fused linear cross-entropy compute the loss (no logits); elsewhere, and for
evaluation, Liger's forward computes the logits at the completion positions.

- CPU: Liger's real patched forward (its RoPE/RMSNorm/SwiGLU Triton kernels switched off in
  ``liger_kernel_config``: they need a GPU; the forward itself is PyTorch), applied by the real
  ``Trainer`` (``use_liger_kernel``): training and evaluation give exactly the losses, token
  predictions and trained weights of the same run without Liger, for padded and shared-prefix
  batches.
- GPU (``gpu`` marker): every Liger kernel, the fused loss included: the same losses within
  kernel rounding.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_liger.py``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("liger_kernel")

from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer  # noqa: E402

NO_TRITON = {"rope": False, "rms_norm": False, "swiglu": False}


def _model(device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device)


def _rows(n: int = 24) -> Any:
    """Rows of 3 shared prefixes (schemas) with questions and answers of varied lengths, so the
    completion positions differ from row to row within a batch."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(3, 512, (k,), generator=g).tolist() for k in (9, 14, 6)]
    rows = []
    for i in range(n):
        prefix = prefixes[i % 3]
        question = torch.randint(3, 512, (3 + i % 5,), generator=g).tolist()
        answer = torch.randint(3, 512, (2 + i % 7,), generator=g).tolist()
        ids = prefix + question + answer
        rows.append(
            {
                "input_ids": ids,
                "labels": [-100] * (len(prefix) + len(question)) + answer,
                "prefix_len": len(prefix),
            }
        )
    return Dataset.from_list(rows)


def _train(
    tmp_path: Path, *, liger: dict[str, bool] | None, prefix_sharing: bool, device: str = "cpu"
) -> tuple[list[float], dict[str, float], dict[str, torch.Tensor], Any]:
    from transformers import TrainingArguments

    data = _rows()
    args = TrainingArguments(
        output_dir=str(tmp_path / ("liger" if liger is not None else "plain")),
        use_cpu=device == "cpu",
        max_steps=4,
        per_device_train_batch_size=6,
        per_device_eval_batch_size=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=3,
        use_liger_kernel=liger is not None,
        liger_kernel_config=liger,
    )
    trainer = Text2SqlTrainer(
        model=_model(device),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=CompletionCollator(0, prefix_sharing=prefix_sharing),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = next(h for h in trainer.state.log_history if "eval_loss" in h)
    weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return losses, evals, weights, trainer


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["padding", "prefix-sharing"])
def test_liger_forward_trains_like_the_plain_model(tmp_path: Path, prefix_sharing: bool) -> None:
    from trainer.hf_trainer import uses_liger_forward

    plain = _train(tmp_path, liger=None, prefix_sharing=prefix_sharing)
    liger = _train(tmp_path, liger=NO_TRITON, prefix_sharing=prefix_sharing)
    # Liger's forward really ran (the Trainer applied it in train()).
    assert uses_liger_forward(liger[3].model) and not uses_liger_forward(plain[3].model)
    assert len(liger[0]) == 4
    assert liger[0] == pytest.approx(plain[0], abs=1e-6)
    assert liger[1]["eval_loss"] == pytest.approx(plain[1]["eval_loss"], abs=1e-6)
    assert liger[1]["eval_token_accuracy"] == plain[1]["eval_token_accuracy"]
    for name, w in plain[2].items():
        torch.testing.assert_close(liger[2][name], w, atol=1e-6, rtol=0, msg=name)
    # ...and training did something: the weights moved.
    assert not torch.equal(plain[2]["lm_head.weight"], _model().state_dict()["lm_head.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
def test_liger_all_kernels_and_fused_loss_on_gpu(tmp_path: Path) -> None:
    from trainer.hf_trainer import uses_liger_forward

    plain = _train(tmp_path, liger=None, prefix_sharing=False, device="cuda")
    liger = _train(tmp_path, liger={}, prefix_sharing=False, device="cuda")
    assert uses_liger_forward(liger[3].model, fused=True)
    # Different kernels, different rounding: close, not identical.
    assert liger[0] == pytest.approx(plain[0], rel=2e-3)
    assert liger[1]["eval_loss"] == pytest.approx(plain[1]["eval_loss"], rel=2e-3)
