"""The HuggingFace `Trainer` specialised for completion-only SQL fine-tuning.

- `CompletionCollator` pads a batch on the right (labels -100 at padding, by position) or, with
  ``packing=True``, concatenates the batch into one padding-free row whose ``position_ids``
  restart at every example. Attention then stays inside each example: transformers derives a
  block-diagonal causal mask from restarting ``position_ids`` when neither an
  ``attention_mask`` nor a KV cache is passed -- hence ``use_cache=False`` in
  `Text2SqlTrainer._completion_forward`: with a cache, transformers 5 skips that detection and
  packed examples attend to each other (tested in tests/test_prefix_sharing.py).
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
    """Dynamic padding, padding-free packing, or shared-prefix packing of completion-only rows.

    ``prefix_sharing``: rows whose prompts start with the same ids (the system prompt and the
    schema: every Spider question about one database) become ONE sequence -- the prefix once,
    then each row's own tokens (question, answer) as a block. A 4D mask lets each block see the
    prefix and itself only, and each block's ``position_ids`` continue from the prefix as if it
    were alone, so every row's logits and loss are those of training it on its own
    (tests/test_prefix_sharing.py) while the schema is computed once instead of once per row.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        packing: bool = False,
        prefix_sharing: bool = False,
        pad_to_multiple_of: int = 1,
    ):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.prefix_sharing = prefix_sharing
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def _shared(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for r in rows:
            p = int(r.get("prefix_len") or 0)
            groups.setdefault(tuple(r["input_ids"][:p]), []).append(r)
        seqs = []
        for prefix, members in groups.items():
            n_prefix = len(prefix)
            ids, labels, pos, block = list(prefix), [IGNORE_INDEX] * n_prefix, [], []
            pos.extend(range(n_prefix))
            block.extend([-1] * n_prefix)
            for k, r in enumerate(members):
                rest = r["input_ids"][n_prefix:]
                ids.extend(rest)
                labels.extend(r["labels"][n_prefix:])
                pos.extend(range(n_prefix, n_prefix + len(rest)))
                block.extend([k] * len(rest))
            seqs.append((ids, labels, pos, block))
        width = max(len(s[0]) for s in seqs)
        m = self.pad_to_multiple_of
        width = (width + m - 1) // m * m
        b = len(seqs)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels_t = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        block_t = torch.full((b, width), -2, dtype=torch.long)  # -2: padding
        for i, (ids, labels, pos, block) in enumerate(seqs):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            labels_t[i, :n] = torch.tensor(labels)
            position_ids[i, :n] = torch.tensor(pos)
            block_t[i, :n] = torch.tensor(block)
        q = block_t[:, :, None]
        kv = block_t[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = causal & (kv == -1) & (q != -2)  # everyone sees the prefix...
        allowed |= causal & (kv == q) & (q >= -1)  # ...and its own block (prefix: itself)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding rows: themselves (no NaNs)
        return {
            "input_ids": input_ids,
            "labels": labels_t,
            "position_ids": position_ids,
            "attention_mask": allowed[:, None, :, :],
        }

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.prefix_sharing:
            return self._shared(rows)
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


class PrefixGroupedSampler(torch.utils.data.Sampler[int]):
    """Orders rows so each batch holds rows with the same prompt prefix (same schema).

    Per epoch (seeded by ``seed + epoch``, so a resumed run replays the same order): shuffle
    each prefix group, cut it into full batches, put the leftovers of all groups together into
    mixed batches, shuffle the batches. Every row appears exactly once per epoch.
    """

    def __init__(self, prefix_keys: Sequence[Any], batch_size: int, seed: int = 0):
        self.keys = list(prefix_keys)
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[Any, list[int]] = {}
        for i, k in enumerate(self.keys):
            groups.setdefault(k, []).append(i)
        batches: list[list[int]] = []
        leftovers: list[int] = []
        for members in groups.values():
            perm = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            full = len(perm) // self.batch_size * self.batch_size
            batches.extend(perm[i : i + self.batch_size] for i in range(0, full, self.batch_size))
            leftovers.extend(perm[full:])
        leftovers = [leftovers[j] for j in torch.randperm(len(leftovers), generator=g).tolist()]
        batches.extend(
            leftovers[i : i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)
        )
        # A partial batch (at most one) goes last so batch boundaries stay aligned.
        partial = [b for b in batches if len(b) < self.batch_size]
        full_batches = [b for b in batches if len(b) == self.batch_size]
        order = torch.randperm(len(full_batches), generator=g).tolist()
        for j in order:
            yield from full_batches[j]
        for b in partial:
            yield from b


def uses_liger_forward(model: Any, *, fused: bool = False) -> bool:
    """Whether ``model``'s causal-LM forward was replaced by Liger's (``use_liger_kernel``).

    ``fused``: and Liger's fused linear cross-entropy can compute the loss there: a Triton
    kernel, so the LM head must be on a GPU; and it reads the head's weight directly, so not
    under ZeRO-3, whose partitioned weight only the head's own forward gathers. Otherwise the
    loss comes from logits at the completion positions, computed by Liger's forward too.
    """
    base = model
    while hasattr(base, "module"):  # DDP / DeepSpeed engine
        base = base.module
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    forward = getattr(base, "forward", None)
    module = getattr(getattr(forward, "__func__", forward), "__module__", "") or ""
    if not module.startswith("liger_kernel"):
        return False
    return not fused or _fused_loss_possible(base)


def _fused_loss_possible(model: Any) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight.is_cuda and not hasattr(head.weight, "ds_id")


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

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        collator = self.data_collator
        if getattr(collator, "prefix_sharing", False) and "prefix_len" in getattr(
            dataset, "column_names", []
        ):
            keys = [
                hash(tuple(ids[:p]))
                for ids, p in zip(dataset["input_ids"], dataset["prefix_len"], strict=True)
            ]
            return PrefixGroupedSampler(
                keys, self.args.per_device_train_batch_size, seed=self.args.seed
            )
        return super()._get_train_sampler(train_dataset)

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
        if uses_liger_forward(model):
            # Liger's forward slices ``hidden_states[:, logits_to_keep, :]``: it takes an int
            # or 1-D positions, not transformers' 2-D mask. Keep the columns any row needs,
            # then the rows' own positions.
            cols = keep.any(dim=0).nonzero()[:, 0]
            outputs = model(**inputs, logits_to_keep=cols, use_cache=False, skip_logits=False)
            logits = outputs.logits[keep[:, cols]]
        else:
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        return logits, targets, keep

    def _fused_loss_sum(
        self, model: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the completion tokens' cross-entropy by Liger's fused linear cross-entropy:
        the LM head and the loss in chunks, no logits kept (training only: no predictions)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        keep, targets = completion_targets(labels)
        cols = keep.any(dim=0).nonzero()[:, 0]
        shift = torch.full_like(labels, IGNORE_INDEX)
        shift[:, :-1] = labels[:, 1:]
        outputs = model(
            **inputs,
            logits_to_keep=cols,
            shift_labels=shift[:, cols].contiguous(),
            skip_logits=True,
            # Liger divides its "sum" reduction by this: 1 gives the sum itself.
            num_items_in_batch=1,
            use_cache=False,
        )
        return outputs.loss, targets

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training and not return_outputs and uses_liger_forward(model, fused=True):
            logits = None
            loss_sum, targets = self._fused_loss_sum(model, inputs)
        else:
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
            # Generate in the training precision (bf16 autocast over fp32 master weights or
            # fp32 adapters). accelerate puts autocast on the top module's forward only, which
            # `generate` on a peft model bypasses; this covers every engine.
            with self.accelerator.autocast():
                extra = self.generation_metrics(self.model)
            output.metrics.update({f"{prefix}_{k}": v for k, v in extra.items()})
        return output
