"""The HuggingFace `Trainer` specialised for completion-only SQL fine-tuning.

- `CompletionCollator` pads a batch on the right with a 2-D mask or -- ``prefix_sharing`` (the
  default) or ``packing`` -- lays it out as ONE padding-free row: rows on one schema share one
  copy of it, each row's own tokens follow as a span, and ``segments`` tell the attention
  which spans see which (`trainer.segment_attention`: one SDPA call per span on CPU,
  FlexAttention with a block mask on CUDA). No cross-row attention is computed and nothing is
  padded, so the cost grows linearly with the batch. `Text2SqlTrainer` switches the model to
  segment attention when its collator emits segments (plain SDPA for everything else).
- `PrefixGroupedSampler` fills fixed-size batches with rows of one schema;
  `TokenBudgetBatchSampler` (``efficiency.max_tokens_per_batch``) fills each batch up to a
  token budget instead, prefix groups together, the same number of batches on every rank.
- `Text2SqlTrainer.compute_loss` projects only the positions whose next token is trained onto
  the vocabulary (``logits_to_keep`` as a boolean mask). Prompt positions never reach the
  49k-wide LM head: the same loss as the default path, less compute and far less memory.
- Evaluation takes the argmax inside `prediction_step` (no full logits are gathered) and adds
  token accuracy, then the generation-based metrics (execution accuracy on a fixed validation
  subset) so the searcher can pick the checkpoint that writes correct SQL.

Why transformers' `Trainer` and not trl's `SFTTrainer`/`SFTConfig` (measured, trl 1.16.0,
``benchmarks/train_bench.py --recipes b,t,c``, benchmarks/README.md): on the same Spider rows
`SFTTrainer` with completion-only loss trains the same loss as a plain `Trainer` with dynamic
padding, 1.4-1.8x slower on CPU (its chunked LM head runs at every position); its padding-free
mode needs FlashAttention, and it has no prefix sharing. This module's path is 5.6x (LoRA) /
5.3x (full fine-tune) faster than `SFTTrainer` there. What trl would give (completion-only
loss, a peft config) is already here: labels are -100 outside the completion
(`dataset_utils.formatting`), the adapter comes from `trainer.modeling`.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.modeling_layers import GradientCheckpointingLayer

from dataset_utils.formatting import IGNORE_INDEX
from trainer.segment_attention import Segments, enable_segment_attention, uses_segment_attention


class CompletionCollator:
    """Dynamic padding, padding-free packing, or shared-prefix packing of completion-only rows.

    - default: right padding to the longest row (labels -100 at padding, by position) with a
      2-D attention mask.
    - ``prefix_sharing``: the batch becomes ONE row with no padding. Rows whose prompts start
      with the same ids (the system prompt and the schema: every Spider question about one
      database) share one copy of that prefix, followed by each row's own tokens (question,
      answer) as a block whose ``position_ids`` continue from the prefix as if it were alone;
      rows that share nothing follow as they are. ``segments``
      (`trainer.segment_attention.Segments`) tells the attention which spans see which: a block
      sees the prefix and itself, a row only itself. Each row's logits and loss are those of
      training it on its own (tests/test_prefix_sharing.py), the schema is computed once, and
      no attention is computed between rows (`trainer.segment_attention`).
    - ``packing``: the batch becomes one row, each example a span of its own. With
      ``segments=False`` (flash-attn) only ``position_ids`` mark the examples, which
      transformers turns into variable-length attention (or, for SDPA, a block-diagonal mask).

    A row whose next token after the prefix is trained is not shared: the prefix's last
    position would need a different target per row.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        packing: bool = False,
        prefix_sharing: bool = False,
        segments: bool = True,
        pad_to_multiple_of: int = 1,
    ):
        if prefix_sharing and not segments:
            raise ValueError("prefix_sharing needs segments (segment attention)")
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.prefix_sharing = prefix_sharing
        self.segments = segments
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    @property
    def emits_segments(self) -> bool:
        """Whether batches carry ``segments`` (the model must use segment attention)."""
        return self.segments and (self.packing or self.prefix_sharing)

    def _groups(self, rows: Sequence[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
        """(shared prefix length, rows) in order of first appearance; 0: not shared."""
        if not self.prefix_sharing:
            return [(0, [r]) for r in rows]
        groups: dict[Any, tuple[int, list[dict[str, Any]]]] = {}
        for i, r in enumerate(rows):
            p = shared_prefix_len(r["input_ids"], r["labels"], r.get("prefix_len"))
            key = tuple(r["input_ids"][:p]) if p else i
            groups.setdefault(key, (p, []))[1].append(r)
        return [(p if len(members) > 1 else 0, members) for p, members in groups.values()]

    def _flat(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        spans: list[tuple[int, int, int, int]] = []

        def add(
            tokens: Sequence[int], lab: Sequence[int], first: int, ctx: tuple[int, int]
        ) -> None:
            s = len(ids)
            ids.extend(tokens)
            labels.extend(lab)
            pos.extend(range(first, first + len(tokens)))
            spans.append((*ctx, s, len(ids)))

        for p, members in self._groups(rows):
            if p == 0:
                for r in members:
                    add(r["input_ids"], r["labels"], 0, (0, 0))
                continue
            add(members[0]["input_ids"][:p], [IGNORE_INDEX] * p, 0, (0, 0))
            prefix = (spans[-1][2], spans[-1][3])
            for r in members:
                add(r["input_ids"][p:], r["labels"][p:], p, prefix)
        m = self.pad_to_multiple_of
        pad = -len(ids) % m
        if pad:
            add([self.pad_token_id] * pad, [IGNORE_INDEX] * pad, 0, (0, 0))
        n = len(ids)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            # No padding: SDPA's mask builder then builds no mask at all (the spans are the mask).
            "attention_mask": torch.ones((1, n), dtype=torch.long),
            "segments": Segments(tuple(spans), n),
        }

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.emits_segments:
            return self._flat(rows)
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
        labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            attention[i, :n] = 1
            labels_t[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels_t}


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


def shared_prefix_len(input_ids: Sequence[int], labels: Sequence[int], prefix_len: Any) -> int:
    """How many leading ids this row may share with rows on the same prompt prefix (0: none).

    Not shared when the first token after the prefix is trained: the prefix's last position
    would then need a different target for each row that continues it.
    """
    p = int(prefix_len or 0)
    return p if 0 < p < len(input_ids) and labels[p] == IGNORE_INDEX else 0


def _shuffled_groups(keys: Sequence[Any], g: torch.Generator) -> list[list[int]]:
    """Row indices grouped by key (in order of first appearance), shuffled within each group."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return [
        [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        for members in groups.values()
    ]


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
        batches: list[list[int]] = []
        leftovers: list[int] = []
        for perm in _shuffled_groups(self.keys, g):
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


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of varying size, each at most ``max_tokens`` positions, prefix groups together.

    A batch's cost is the number of positions the collator makes of it (``input_ids.numel()``,
    what activation memory and step time scale with): for ``layout="shared"`` (prefix sharing)
    each group's shared prefix once plus every row's own tokens, for ``"packed"`` the sum of
    the lengths, for ``"padded"`` rows x the longest row. A row longer than the budget gets a
    batch of its own (the config refuses a budget below ``data.max_length``).

    Per epoch (seeded by ``seed + epoch``, so a resumed run replays the same batches): shuffle
    each prefix group and cut it into chunks that fit; shuffle the chunks and place each in the
    first of the last 16 open batches it fits (padded: rows in length-sorted windows, next
    fit); merge batches that fit together; shuffle the batches. Every row appears exactly once
    per epoch.

    Every epoch has the same number of batches (the first epoch's, rounded up to a multiple of
    ``num_replicas``): the Trainer sizes an epoch once, and under DDP/DeepSpeed accelerate deals
    batch i to rank i % num_replicas, so every rank gets the same number of batches. An epoch
    whose draw needs more batches is drawn again (seeded); one that needs fewer splits its
    largest batches (at a group boundary where there is one).
    """

    WINDOW = 16  # open batches a chunk may join (first fit)
    ATTEMPTS = 32  # draws per epoch to find a composition that fits the epoch's batch count
    PADDED_WINDOW = 64  # rows sorted by length together (padded layout)

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        prefix_keys: Sequence[Any] | None = None,
        prefix_lens: Sequence[int] | None = None,
        layout: str = "shared",
        seed: int = 0,
        num_replicas: int = 1,
    ):
        if layout not in ("shared", "packed", "padded"):
            raise ValueError(f"layout must be shared, packed or padded, found {layout!r}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, found {max_tokens}")
        self.lengths = [int(n) for n in lengths]
        n = len(self.lengths)
        shared = layout == "shared" and prefix_keys is not None and prefix_lens is not None
        self.keys: list[Any] = list(prefix_keys) if shared else list(range(n))  # type: ignore[arg-type]
        self.prefix = [int(p) for p in prefix_lens] if shared else [0] * n  # type: ignore[union-attr]
        self.max_tokens = max_tokens
        self.layout = layout
        self.seed = seed
        self.num_replicas = max(1, num_replicas)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        first = self._compose(0)
        target = len(first) + (-len(first) % self.num_replicas)
        self.num_batches = min(target, n) if n else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Any:
        yield from self.batches(self.epoch)

    def cost(self, batch: Sequence[int]) -> int:
        """Positions the collator makes of these rows."""
        if self.layout == "padded":
            return len(batch) * max((self.lengths[i] for i in batch), default=0)
        groups: dict[Any, int] = {}
        total = 0
        for i in batch:
            total += self.lengths[i]
            if self.keys[i] in groups:  # the prefix is already there
                total -= self.prefix[i]
            groups[self.keys[i]] = 1
        return total

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches, in order (deterministic in seed and epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        # Another draw when this one needs more batches than the epoch has (rare: a random
        # composition needs about as many batches as the first epoch's).
        for attempt in range(self.ATTEMPTS):
            composed = self._compose(epoch, attempt)
            if len(composed) <= self.num_batches:
                break
        out = self._even(composed, self.num_batches)
        g = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
        out = [out[j] for j in torch.randperm(len(out), generator=g).tolist()]
        self._cache = (epoch, out)
        return out

    def _compose(self, epoch: int, attempt: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch + 7_919 * attempt)
        budget = self.max_tokens
        if self.layout == "padded":
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            w = self.PADDED_WINDOW
            order = [
                i
                for k in range(0, len(order), w)
                for i in sorted(order[k : k + w], key=lambda i: -self.lengths[i])
            ]
            batches: list[list[int]] = []
            longest = 0
            for i in order:
                longest = max(longest, self.lengths[i])
                if batches and (len(batches[-1]) + 1) * longest <= budget:
                    batches[-1].append(i)
                else:
                    batches.append([i])
                    longest = self.lengths[i]
            return self._merge(batches)
        chunks: list[tuple[int, list[int]]] = []  # (cost, rows of one group)
        for members in _shuffled_groups(self.keys, g):
            cost, chunk = 0, []
            for i in members:
                add = self.lengths[i] - (self.prefix[i] if chunk else 0)
                if chunk and cost + add > budget:
                    chunks.append((cost, chunk))
                    cost, chunk, add = 0, [], self.lengths[i]
                cost += add
                chunk.append(i)
            chunks.append((cost, chunk))
        chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=g).tolist()]
        done: list[list[int]] = []
        open_: list[tuple[int, list[int]]] = []  # chunk costs add up to a bound of the cost
        for c, chunk in chunks:
            for k, (have, rows) in enumerate(open_):
                if have + c <= budget:
                    open_[k] = (have + c, rows + chunk)
                    break
            else:
                open_.append((c, list(chunk)))
                if len(open_) > self.WINDOW:
                    done.append(open_.pop(0)[1])
        return self._merge(done + [rows for _, rows in open_])

    def _merge(self, batches: list[list[int]], until: int = 0) -> list[list[int]]:
        """Merge the cheapest batches into others while they fit (down to ``until``)."""
        items = sorted((self.cost(b), b) for b in batches)
        costs = [c for c, _ in items]
        rows = [b for _, b in items]
        k = 0
        while k < len(rows) and len(rows) > until:
            # The costliest partner the sum of the two costs allows (an upper bound of the
            # merged cost, except in the padded layout: a few exact tries downwards).
            j = min(bisect.bisect_right(costs, self.max_tokens - costs[k]), len(rows)) - 1
            for cand in range(j, max(k, j - 8), -1):
                merged = rows[cand] + rows[k]
                c = self.cost(merged)
                if c <= self.max_tokens:
                    for x in (cand, k):  # cand > k: delete the later one first
                        del costs[x], rows[x]
                    at = bisect.bisect_left(costs, c)
                    costs.insert(at, c)
                    rows.insert(at, merged)
                    break
            else:
                k += 1
        return rows

    def _even(self, batches: list[list[int]], target: int) -> list[list[int]]:
        if len(batches) > target:
            batches = self._merge(batches, until=target)
        if len(batches) > target:
            logging.getLogger("trainer").warning(
                "efficiency.max_tokens_per_batch: epoch %d needs %d batches, the epoch has %d; "
                "%d batches are skipped this epoch",
                self.epoch,
                len(batches),
                target,
                len(batches) - target,
            )
        while len(batches) < target:
            j = max(range(len(batches)), key=lambda b: len(batches[b]))
            b = batches[j]
            if len(b) < 2:
                break
            # Cut at the group boundary nearest the middle (rows of a group are adjacent).
            cuts = [c for c in range(1, len(b)) if self.keys[b[c]] != self.keys[b[c - 1]]]
            mid = min(cuts, key=lambda c: abs(c - len(b) / 2)) if cuts else len(b) // 2
            batches[j : j + 1] = [b[:mid], b[mid:]]
        return batches


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
        max_tokens_per_batch: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_metrics", token_accuracy)
        super().__init__(*args, **kwargs)
        self.generation_metrics = generation_metrics
        self.checkpointing_min_tokens = checkpointing_min_tokens
        self.max_tokens_per_batch = max_tokens_per_batch
        if getattr(self.data_collator, "emits_segments", False):
            # Shared-prefix / packed batches are one row split into spans; the model's
            # attention must read them (plain SDPA otherwise, so generation is unchanged).
            enable_segment_attention(self.model)
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

    def _prefix_groups(self, dataset: Any) -> tuple[list[Any], list[int]] | None:
        """Per row, the key of the prefix the collator will share and its length; None when
        the collator shares no prefixes."""
        if not getattr(self.data_collator, "prefix_sharing", False) or "prefix_len" not in getattr(
            dataset, "column_names", []
        ):
            return None
        ids, labels = dataset["input_ids"], dataset["labels"]
        lens = [
            shared_prefix_len(i, lab, p)
            for i, lab, p in zip(ids, labels, dataset["prefix_len"], strict=True)
        ]
        keys = [
            hash(tuple(i[:p])) if p else ("row", n)
            for n, (i, p) in enumerate(zip(ids, lens, strict=True))
        ]
        return keys, lens

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        groups = self._prefix_groups(dataset)
        if groups is not None:
            return PrefixGroupedSampler(
                groups[0], self.args.per_device_train_batch_size, seed=self.args.seed
            )
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> Any:
        """With ``max_tokens_per_batch``: batches from `TokenBudgetBatchSampler` instead of
        ``per_device_train_batch_size`` rows."""
        if self.max_tokens_per_batch is None or self.train_dataset is None:
            return super().get_train_dataloader()
        import datasets
        from transformers.trainer_utils import seed_worker

        dataset = self.train_dataset
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        groups = self._prefix_groups(dataset)
        packing = getattr(self.data_collator, "packing", False)
        sampler = TokenBudgetBatchSampler(
            [len(i) for i in dataset["input_ids"]],
            self.max_tokens_per_batch,
            prefix_keys=groups[0] if groups else None,
            prefix_lens=groups[1] if groups else None,
            layout="shared" if groups else "packed" if packing else "padded",
            seed=self.args.seed,
            num_replicas=self.args.world_size,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=functools.partial(
                seed_worker,
                num_workers=self.args.dataloader_num_workers,
                rank=self.args.process_index,
            ),
        )
        # Under DDP/DeepSpeed accelerate deals batch i to rank i % world_size (the sampler's
        # batch count is a multiple of it, so every rank gets as many).
        return self.accelerator.prepare(loader)

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
        if "segments" in inputs and not uses_segment_attention(self.model):
            raise ValueError(
                "the batch holds segments (prefix sharing / packing) but the model does not use "
                "segment attention: rows would attend to each other"
            )
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
