"""Token-budget batching (`efficiency.max_tokens_per_batch`): `TokenBudgetBatchSampler`.

Batches hold as many rows as fit in the budget (counted as the collator lays them out), every
row once per epoch, prefix groups together, the same number of batches every epoch and on
every DDP rank, reproducible from the seed and the epoch.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests import tiny


def _synthetic(seed: int = 0) -> tuple[list[int], list[Any], list[int]]:
    """Spider-like groups (a schema prefix of 100-600 tokens, 1-60 questions of 20-80 tokens)
    and sql-create-context-like singletons (~120 tokens, nothing shared)."""
    rng = random.Random(seed)
    lengths, keys, prefix = [], [], []
    for g in range(40):
        p = rng.randint(100, 600)
        for _ in range(rng.randint(1, 60)):
            lengths.append(p + rng.randint(20, 80))
            keys.append(("db", g))
            prefix.append(p)
    for i in range(300):
        lengths.append(rng.randint(60, 200))
        keys.append(("row", i))
        prefix.append(rng.randint(30, 50))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [lengths[i] for i in order], [keys[i] for i in order], [prefix[i] for i in order]


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_budget_respected_every_row_once_groups_together(layout: str) -> None:
    from trainer.hf_trainer import TokenBudgetBatchSampler

    lengths, keys, prefix = _synthetic()
    budget = 2048
    s = TokenBudgetBatchSampler(
        lengths, budget, prefix_keys=keys, prefix_lens=prefix, layout=layout, seed=5
    )
    n_rows = len(lengths)
    seen_epochs = []
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)  # the same count every epoch (the Trainer sizes once)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(n_rows))  # every row exactly once
        assert all(s.cost(b) <= budget for b in batches)
        # Well filled: the batches hold most of the budget on average.
        fill = sum(s.cost(b) for b in batches) / (len(batches) * budget)
        assert fill > (0.85 if layout != "padded" else 0.7), fill
        seen_epochs.append(batches)
        if layout == "shared":
            # A group whose rows fit the budget together sits in one batch (epoch 0: as
            # composed; later epochs may split a batch to keep the count: rarely).
            groups: dict[Any, set[int]] = {}
            where = {i: k for k, b in enumerate(batches) for i in b}
            for i, key in enumerate(keys):
                groups.setdefault(key, set()).add(i)
            fitting = [m for m in groups.values() if s.cost(sorted(m)) <= budget and len(m) > 1]
            together = sum(1 for m in fitting if len({where[i] for i in m}) == 1)
            assert together == len(fitting) if epoch == 0 else together >= 0.9 * len(fitting)
    # Reproducible per seed and epoch, different across epochs.
    again = TokenBudgetBatchSampler(
        lengths, budget, prefix_keys=keys, prefix_lens=prefix, layout=layout, seed=5
    )
    again.set_epoch(2)
    assert list(again) == seen_epochs[2]
    assert seen_epochs[0] != seen_epochs[1]


def test_shared_layout_packs_more_rows_than_fixed_batches() -> None:
    """With the schema counted once, a 2,048-token budget holds a whole Spider-size group."""
    from trainer.hf_trainer import TokenBudgetBatchSampler

    lengths = [400 + 40] * 30  # one schema of 400 tokens, 30 questions of 40
    s = TokenBudgetBatchSampler(lengths, 2048, prefix_keys=["a"] * 30, prefix_lens=[400] * 30)
    batches = list(s)
    assert [len(b) for b in batches] == [30]  # 400 + 30 x 40 = 1,600 positions
    assert s.cost(batches[0]) == 1600
    packed = TokenBudgetBatchSampler(lengths, 2048, layout="packed")
    assert max(len(b) for b in packed) == 4  # 4 x 440 without sharing


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_get_the_same_number_of_batches(world: int) -> None:
    """Through accelerate's own `BatchSamplerShard` (what `accelerator.prepare` wraps the batch
    sampler in under DDP/DeepSpeed): every rank gets as many batches, every row once."""
    from accelerate.data_loader import BatchSamplerShard

    from trainer.hf_trainer import TokenBudgetBatchSampler

    lengths, keys, prefix = _synthetic(1)
    for epoch in range(3):
        s = TokenBudgetBatchSampler(
            lengths, 3000, prefix_keys=keys, prefix_lens=prefix, seed=1, num_replicas=world
        )
        s.set_epoch(epoch)
        assert len(s) % world == 0
        per_rank = [
            list(BatchSamplerShard(s, num_processes=world, process_index=r)) for r in range(world)
        ]
        assert {len(b) for b in per_rank} == {len(s) // world}
        rows = sorted(i for rank in per_rank for b in rank for i in b)
        assert rows == list(range(len(lengths)))


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny.tokenizer()


def _rows(tok: Any, n: int = 30) -> list[dict[str, Any]]:
    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.records import Example

    schemas = [
        "CREATE TABLE singer (name TEXT, age INT, country TEXT)",
        "CREATE TABLE head (age INTEGER)",
        "CREATE TABLE stadium (id INT, capacity INT, name TEXT, city TEXT, opened INT)",
    ]
    ex = [
        Example(f"question {i}{' and more' * (i % 4)}?", schemas[i % 3], f"SELECT {i}", "t")
        for i in range(n)
    ]
    t = tokenize_examples(ex, tok, plan_format("chatml", tok), None)
    return [
        {"input_ids": i, "labels": lab, "prefix_len": p, "rid": k}
        for k, (i, lab, p) in enumerate(zip(t.input_ids, t.labels, t.prefix_len, strict=True))
    ]


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_cost_is_what_the_collator_builds(tok: Any, layout: str) -> None:
    from trainer.hf_trainer import CompletionCollator, TokenBudgetBatchSampler, shared_prefix_len

    rows = _rows(tok)
    collator = CompletionCollator(
        tok.pad_token_id, prefix_sharing=layout == "shared", packing=layout == "packed"
    )
    lens = [shared_prefix_len(r["input_ids"], r["labels"], r["prefix_len"]) for r in rows]
    keys = [tuple(r["input_ids"][:p]) for r, p in zip(rows, lens, strict=True)]
    s = TokenBudgetBatchSampler(
        [len(r["input_ids"]) for r in rows],
        300,
        prefix_keys=keys,
        prefix_lens=lens,
        layout=layout,
    )
    batches = list(s)
    assert len(batches) > 1
    for b in batches:
        assert collator([rows[i] for i in b])["input_ids"].numel() == s.cost(b) <= 300


def test_trainer_trains_on_token_budget_batches(tmp_path: Path, tok: Any) -> None:
    """The real Trainer (accelerate-prepared DataLoader) draws its batches from the budget
    sampler, reaches its epoch (a new order per epoch, every row once per epoch), and trains."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainingArguments

    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer

    rows = _rows(tok)
    seen: list[list[int]] = []
    sizes: list[int] = []

    class Recording(CompletionCollator):
        def __call__(self, batch: Any) -> Any:
            seen.append([r["rid"] for r in batch])
            out = super().__call__(batch)
            sizes.append(out["input_ids"].numel())
            return out

    model = AutoModelForCausalLM.from_pretrained(
        tiny.make_tiny_model(tmp_path / "tiny"), attn_implementation="sdpa"
    )
    budget = 400
    trainer = Text2SqlTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            num_train_epochs=2,
            per_device_train_batch_size=2,  # ignored: the budget decides
            learning_rate=1e-3,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=3,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=Recording(tok.pad_token_id, prefix_sharing=True),
        max_tokens_per_batch=budget,
    )
    steps_per_epoch = len(trainer.get_train_dataloader())
    seen.clear()
    sizes.clear()
    trainer.train()
    assert trainer.state.global_step == 2 * steps_per_epoch
    assert len(seen) == 2 * steps_per_epoch
    assert max(sizes) <= budget and max(len(b) for b in seen) > 2
    epochs = [seen[:steps_per_epoch], seen[steps_per_epoch:]]
    for e in epochs:
        assert sorted(r for b in e for r in b) == list(range(len(rows)))
    assert epochs[0] != epochs[1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 * steps_per_epoch
    first, second = losses[:steps_per_epoch], losses[steps_per_epoch:]
    assert sum(second) / len(second) < sum(first) / len(first)
