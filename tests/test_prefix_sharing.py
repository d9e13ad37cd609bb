"""Shared-prefix packing and padding-free packing are exact: no cross-example attention.

Every example's completion log-probabilities must be those of running it on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.records import Example

    path = tiny.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")
    tok = tiny.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    schema_a = "CREATE TABLE singer (name TEXT, age INT, country TEXT)"
    schema_b = "CREATE TABLE head (age INTEGER)"
    examples = [
        Example("How many singers?", schema_a, "SELECT count(*) FROM singer", "t"),
        Example(
            "Names of singers over 30?", schema_a, "SELECT name FROM singer WHERE age > 30", "t"
        ),
        Example("Countries?", schema_a, "SELECT DISTINCT country FROM singer", "t"),
        Example(
            "How many heads are older than 56?",
            schema_b,
            "SELECT COUNT(*) FROM head WHERE age > 56",
            "t",
        ),
    ]
    plan = plan_format("chatml", tok)
    t = tokenize_examples(examples, tok, plan, None)
    rows = [
        {"input_ids": i, "labels": lab, "prefix_len": p}
        for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)
    ]
    return model, tok, rows


def _alone(model, row) -> torch.Tensor:
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    mask = labels[1:] != -100
    return logp[:-1][mask].gather(-1, labels[1:][mask][:, None])[:, 0]


def _batched(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logp = model(**inputs, use_cache=False).logits.log_softmax(-1)
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = shifted != -100
    return logp[:, :-1][mask].gather(-1, shifted[mask][:, None])[:, 0]


def test_same_schema_rows_share_one_prefix(setup) -> None:
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    assert rows[0]["prefix_len"] == rows[1]["prefix_len"] == rows[2]["prefix_len"]
    p = rows[0]["prefix_len"]
    assert rows[0]["input_ids"][:p] == rows[1]["input_ids"][:p]
    batch = CompletionCollator(tok.pad_token_id, prefix_sharing=True)(rows)
    # Two sequences (schema a with 3 questions, schema b with 1), each prefix computed once.
    assert batch["input_ids"].shape[0] == 2
    real_tokens = int((batch["position_ids"] > 0).sum()) + 2
    separate = sum(len(r["input_ids"]) for r in rows)
    assert real_tokens == separate - 2 * p  # the schema-a prefix is not repeated twice
    trained = int((batch["labels"] != -100).sum())
    assert trained == sum(sum(1 for x in r["labels"] if x != -100) for r in rows)


@pytest.mark.parametrize("mode", ["prefix_sharing", "padding", "packing"])
def test_per_example_logprobs_equal_running_alone(setup, mode: str) -> None:
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    collator = CompletionCollator(
        tok.pad_token_id, prefix_sharing=mode == "prefix_sharing", packing=mode == "packing"
    )
    batch = collator(rows)
    got = _batched(model, batch)
    # Order of completion tokens: prefix-sharing groups rows by schema in order of appearance,
    # which here is the input order.
    want = torch.cat([_alone(model, r) for r in rows])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["prefix_sharing", "packing"])
def test_no_cross_example_attention(setup, mode: str) -> None:
    """Changing another example's tokens never changes this example's log-probs."""
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    collator = CompletionCollator(
        tok.pad_token_id, prefix_sharing=mode == "prefix_sharing", packing=mode == "packing"
    )
    base = _batched(model, collator(rows))
    p = rows[0]["prefix_len"]
    altered = [dict(r) for r in rows]
    ids = list(altered[1]["input_ids"])
    ids[p + 1] = (ids[p + 1] + 17) % len(tok)  # a question token of row 1
    altered[1]["input_ids"] = ids
    changed = _batched(model, collator(altered))
    n0 = sum(1 for x in rows[0]["labels"] if x != -100)
    n1 = sum(1 for x in rows[1]["labels"] if x != -100)
    torch.testing.assert_close(changed[:n0], base[:n0])  # row 0 untouched
    torch.testing.assert_close(changed[n0 + n1 :], base[n0 + n1 :])  # rows 2, 3 untouched
    assert not torch.allclose(changed[n0 : n0 + n1], base[n0 : n0 + n1])  # row 1 did change


def test_sampler_groups_prefixes_and_covers_every_row_once() -> None:
    from trainer.hf_trainer import PrefixGroupedSampler

    keys = ["a"] * 10 + ["b"] * 7 + ["c", "d", "e"]
    s = PrefixGroupedSampler(keys, batch_size=4, seed=3)
    order = list(s)
    assert sorted(order) == list(range(len(keys)))
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    homogeneous = sum(1 for b in batches if len({keys[i] for i in b}) == 1)
    assert homogeneous >= 3  # two full "a" batches, one full "b" batch
    assert list(PrefixGroupedSampler(keys, 4, seed=3)) == order  # reproducible
    s.set_epoch(1)
    assert list(s) != order


@pytest.mark.parametrize("mode", ["prefix_sharing", "packing"])
def test_training_matches_padding(tmp_path: Path, mode: str) -> None:
    """One backward pass gives the same per-example losses, total loss and gradients with the
    fast path (shared prefix, or padding-free packing) as with plain right padding."""
    from transformers import AutoModelForCausalLM

    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.records import Example
    from trainer.hf_trainer import CompletionCollator, completion_targets

    path = tiny.make_tiny_model(tmp_path / "tiny")
    tok = tiny.tokenizer()
    schema = "CREATE TABLE t (a INT, b TEXT)"
    ex = [
        Example(f"question {i}?", schema, f"SELECT a FROM t WHERE a > {i}", "t") for i in range(5)
    ]
    # Rows of different lengths, so padding really pads and packing really packs.
    ex.append(
        Example(
            "a much longer question about the table t and its columns?",
            schema,
            "SELECT b FROM t WHERE a > 3 AND b LIKE '%x%' ORDER BY a DESC",
            "t",
        )
    )
    t = tokenize_examples(ex, tok, plan_format("chatml", tok), None)
    rows = [
        {"input_ids": i, "labels": lab, "prefix_len": p}
        for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)
    ]
    n_completion = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    grads, losses, per_example = [], [], []
    for fast in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        collator = CompletionCollator(
            tok.pad_token_id,
            prefix_sharing=fast and mode == "prefix_sharing",
            packing=fast and mode == "packing",
        )
        batch = collator(rows)
        if fast and mode == "packing":
            assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
            assert "attention_mask" not in batch  # padding-free: nothing is padded
        labels = batch.pop("labels")
        keep, targets = completion_targets(labels)
        # use_cache=False, as Text2SqlTrainer passes: with a KV cache transformers does not
        # derive the block-diagonal mask from restarting position_ids, and packed examples
        # would attend to each other.
        out = model(**batch, logits_to_keep=keep, use_cache=False)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        # Completion tokens come out in row order in every mode (all rows share one schema).
        per_example.append(torch.stack([c.mean() for c in token_loss.split(n_completion)]))
        loss = token_loss.mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(per_example[0], per_example[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-3)


@pytest.mark.slow
def test_trainer_fast_paths_train_the_same_model(tmp_path: Path) -> None:
    """A short run of the real `Text2SqlTrainer` on the same batches with plain padding, shared
    prefixes and padding-free packing ends in the same weights, so evaluation (loss, token
    accuracy, and any metric computed from the model) agrees."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainingArguments

    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.records import Example
    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer

    path = tiny.make_tiny_model(tmp_path / "tiny")
    tok = tiny.tokenizer()
    schemas = ["CREATE TABLE t (a INT, b TEXT)", "CREATE TABLE singer (name TEXT, age INT)"]
    ex = [
        Example(
            f"question number {i}{' with more words' * (i % 3)}?",
            schemas[i // 6],
            f"SELECT a FROM t WHERE a > {i}"
            if i < 6
            else f"SELECT name FROM singer WHERE age = {i}",
            "t",
        )
        for i in range(12)
    ]
    t = tokenize_examples(ex, tok, plan_format("chatml", tok), None)
    rows = [
        {"input_ids": i, "labels": lab, "prefix_len": p}
        for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)
    ]
    # Batches of 4 in a fixed order: two single-schema batches and one mixed.
    order = [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11]
    train = datasets.Dataset.from_list([rows[i] for i in order])
    valid = datasets.Dataset.from_list(rows)

    class InOrder(Text2SqlTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    finals, metrics = [], []
    for mode in ("padding", "prefix_sharing", "packing"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        args = TrainingArguments(
            output_dir=str(tmp_path / mode),
            max_steps=3,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = InOrder(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=valid,
            data_collator=CompletionCollator(
                tok.pad_token_id,
                prefix_sharing=mode == "prefix_sharing",
                packing=mode == "packing",
            ),
            processing_class=tok,
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 3
        # Evaluate every model the same way (plain padding), so only the weights differ.
        trainer.data_collator = CompletionCollator(tok.pad_token_id)
        metrics.append(trainer.evaluate())
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        metrics[-1]["train_losses"] = losses
    for other in (1, 2):
        torch.testing.assert_close(finals[other], finals[0], atol=1e-4, rtol=1e-3)
        assert metrics[other]["train_losses"] == pytest.approx(metrics[0]["train_losses"], rel=1e-4)
        assert metrics[other]["eval_loss"] == pytest.approx(metrics[0]["eval_loss"], rel=1e-4)
        assert metrics[other]["eval_token_accuracy"] == metrics[0]["eval_token_accuracy"]
