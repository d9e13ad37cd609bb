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
        Example("Names of singers over 30?", schema_a, "SELECT name FROM singer WHERE age > 30",
                "t"),
        Example("Countries?", schema_a, "SELECT DISTINCT country FROM singer", "t"),
        Example("How many heads are older than 56?", schema_b,
                "SELECT COUNT(*) FROM head WHERE age > 56", "t"),
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


def test_no_cross_example_attention(setup) -> None:
    """Changing another example's tokens never changes this example's log-probs."""
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    collator = CompletionCollator(tok.pad_token_id, prefix_sharing=True)
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


def test_training_with_prefix_sharing_matches_padding(tmp_path: Path) -> None:
    """One optimizer step gives the same loss and gradients with and without sharing."""
    from transformers import AutoModelForCausalLM

    from dataset_utils.formatting import plan_format, tokenize_examples
    from dataset_utils.records import Example
    from trainer.hf_trainer import CompletionCollator, completion_targets

    path = tiny.make_tiny_model(tmp_path / "tiny")
    tok = tiny.tokenizer()
    schema = "CREATE TABLE t (a INT, b TEXT)"
    ex = [Example(f"question {i}?", schema, f"SELECT a FROM t WHERE a > {i}", "t")
          for i in range(5)]
    t = tokenize_examples(ex, tok, plan_format("chatml", tok), None)
    rows = [{"input_ids": i, "labels": lab, "prefix_len": p}
            for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)]
    grads = []
    losses = []
    for sharing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        batch = CompletionCollator(tok.pad_token_id, prefix_sharing=sharing)(rows)
        labels = batch.pop("labels")
        keep, targets = completion_targets(labels)
        out = model(**batch, logits_to_keep=keep)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-3)
