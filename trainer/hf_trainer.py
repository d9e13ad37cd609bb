"""The HuggingFace `Trainer` specialised for completion-only SQL fine-tuning.

- `CompletionCollator` pads a batch on the right (labels -100 at padding, by position) or, with
  ``packing=True``, concatenates the batch into one padding-free row whose ``position_ids``
  restart at every example. Attention then stays inside each example: transformers derives a
  block-diagonal causal mask from restarting ``position_ids`` when no ``attention_mask`` is
  passed (tested in tests/test_packing.py).
- `Text2SqlTrainer.compute_loss` projects only the positions whose next token is trained onto
  the vocabulary (``logits_to_keep`` as a boolean mask). Prompt positions never reach the
  49k-wide LM head: the same loss as the default path, less compute and far less memory.
- Evaluation takes the argmax inside `prediction_step` (no full logits are gathered) and adds
  token accuracy, then the generation-based metrics (execution accuracy on a fixed validation
  subset) so the searcher can pick the checkpoint that writes correct SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.modeling_layers import GradientCheckpointingLayer

from dataset_utils.formatting import IGNORE_INDEX


class CompletionCollator:
    """Dynamic padding (or padding-free packing) for pre-tokenized completion-only rows."""

    def __init__(self, pad_token_id: int, *, packing: bool = False, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            ids: list[int] = []
            labels: list[int] = []
            pos: list[int] = []
            for r in rows:
                n = len(r["input_ids"])
                ids.extend(r["input_ids"])
                # The first token of every example is a prompt token (label -100), so the last
                # position of the previous example never learns to predict across the boundary.
                labels.extend(r["labels"])
                pos.extend(range(n))
            return {
                "input_ids": torch.tensor([ids]),
                "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]),
            }
        width = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        width = (width + m - 1) // m * m
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def completion_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of positions whose next token is trained, those next tokens)."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE_INDEX
    return keep, shifted[shifted != IGNORE_INDEX]


def token_accuracy(eval_pred: Any) -> dict[str, float]:
    preds, targets = eval_pred.predictions, eval_pred.label_ids
    preds = torch.as_tensor(preds).reshape(-1)
    targets = torch.as_tensor(targets).reshape(-1)
    valid = targets != IGNORE_INDEX
    n = int(valid.sum())
    acc = float((preds[valid] == targets[valid]).sum()) / n if n else 0.0
    return {"token_accuracy": acc}


class Text2SqlTrainer(Trainer):
    """`Trainer` with completion-only logits and generation-based evaluation metrics."""

    def __init__(
        self,
        *args: Any,
        generation_metrics: Callable[[Any], dict[str, float]] | None = None,
        checkpointing_min_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_metrics", token_accuracy)
        super().__init__(*args, **kwargs)
        self.generation_metrics = generation_metrics
        self.checkpointing_min_tokens = checkpointing_min_tokens
        # Layers prepared for activation checkpointing; with a threshold, it is switched on
        # per batch, only when the batch is long enough for activations to threaten memory.
        self._ckpt_layers = (
            [
                m
                for m in self.model.modules()
                if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
            ]
            if checkpointing_min_tokens is not None
            else []
        )

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._ckpt_layers:
            ids = inputs["input_ids"]
            on = ids.numel() > (self.checkpointing_min_tokens or 0)
            for layer in self._ckpt_layers:
                layer.gradient_checkpointing = on
        return super().training_step(model, inputs, *args, **kwargs)

    def _completion_forward(
        self, model: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        keep, targets = completion_targets(labels)
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        return logits, targets, keep

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        logits, targets, _ = self._completion_forward(model, inputs)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is not None:
            # Same normalisation as the model's own loss with `num_items_in_batch`: a sum over
            # the whole accumulated (and, across devices, global) batch, so gradient
            # accumulation and DDP give the single-process gradient.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = loss_sum / max(1, targets.numel())
            self.loss_is_scaled_for_ga = False
        if return_outputs:
            return loss, {"logits": logits, "targets": targets}
        return loss

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits, targets, _ = self._completion_forward(model, inputs)
            loss = F.cross_entropy(logits.float(), targets, reduction="mean")
        if prediction_loss_only:
            return loss.detach(), None, None
        # argmax before anything is gathered across processes: 1 id per trained token.
        preds = logits.argmax(dim=-1)
        return loss.detach(), preds.reshape(1, -1), targets.reshape(1, -1)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.generation_metrics is not None and prefix == "eval":
            extra = self.generation_metrics(self.model)
            output.metrics.update({f"{prefix}_{k}": v for k, v in extra.items()})
        return output
