"""Shared-prefix packing and padding-free packing are exact: no cross-example attention.

Every example's completion log-probabilities, loss and gradient must be those of running it on
its own (or padded with others): the batch is one flattened row split into spans, read by
segment attention (`trainer.segment_attention`: SDPA per span on CPU, FlexAttention on CUDA).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny

SCHEMA_A = "CREATE TABLE singer (name TEXT, age INT, country TEXT)"
SCHEMA_B = "CREATE TABLE head (age INTEGER)"
SCHEMA_C = "CREATE TABLE t (a INT, b TEXT)"
SCHEMA_D = "CREATE TABLE stadium (id INT, capacity INT, name TEXT, city TEXT)"


def _tokenize(tok: Any, examples: list[Any]) -> list[dict[str, Any]]:
    from dataset_utils.formatting import plan_format, tokenize_examples

    t = tokenize_examples(examples, tok, plan_format("chatml", tok), None)
    return [
        {"input_ids": i, "labels": lab, "prefix_len": p}
        for i, lab, p in zip(t.input_ids, t.labels, t.prefix_len, strict=True)
    ]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def row_sets(tok: Any) -> dict[str, list[dict[str, Any]]]:
    return _row_sets(tok)


@pytest.fixture(scope="module")
def setup(tiny_path: Path, tok: Any):
    from transformers import AutoModelForCausalLM

    from dataset_utils.records import Example
    from trainer.segment_attention import enable_segment_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa").eval()
    # Segment attention: spans when the batch has them, plain SDPA otherwise (padding, alone).
    enable_segment_attention(model)
    examples = [
        Example("How many singers?", SCHEMA_A, "SELECT count(*) FROM singer", "t"),
        Example(
            "Names of singers over 30?", SCHEMA_A, "SELECT name FROM singer WHERE age > 30", "t"
        ),
        Example("Countries?", SCHEMA_A, "SELECT DISTINCT country FROM singer", "t"),
        Example(
            "How many heads are older than 56?",
            SCHEMA_B,
            "SELECT COUNT(*) FROM head WHERE age > 56",
            "t",
        ),
    ]
    return model, tok, _tokenize(tok, examples)


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
    # One flattened row, no padding: schema a's prefix once, its 3 questions as blocks that
    # continue it, then the schema-b row (shares nothing) whole.
    n = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (1, sum(n) - 2 * p)
    assert batch["attention_mask"].all()
    a1, a2, a3 = n[0], n[0] + n[1] - p, n[0] + n[1] + n[2] - 2 * p
    assert batch["segments"].spans == (
        (0, 0, 0, p),
        (0, p, p, a1),
        (0, p, a1, a2),
        (0, p, a2, a3),
        (0, 0, a3, a3 + n[3]),
    )
    # Positions: each block continues the prefix as if alone; the lone row starts at 0.
    pos = batch["position_ids"][0].tolist()
    assert pos[:p] == list(range(p))
    assert pos[a1:a2] == list(range(p, n[1]))
    assert pos[a3:] == list(range(n[3]))
    assert batch["input_ids"][0, a1:a2].tolist() == rows[1]["input_ids"][p:]
    trained = int((batch["labels"] != -100).sum())
    assert trained == sum(sum(1 for x in r["labels"] if x != -100) for r in rows)


def test_segments_mask_is_exactly_prefix_plus_own_block() -> None:
    """The spans' dense mask, written out by hand: 2 prefix tokens, blocks of 2 and 1 tokens
    continuing it, then a standalone row of 2 tokens."""
    from trainer.segment_attention import Segments

    s = Segments(((0, 0, 0, 2), (0, 2, 2, 4), (0, 2, 4, 5), (0, 0, 5, 7)), 7)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(s.dense_mask(), want)
    with pytest.raises(ValueError, match="tile"):
        Segments(((0, 0, 0, 2), (0, 0, 3, 4)), 4)
    with pytest.raises(ValueError, match="earlier span"):
        Segments(((0, 0, 0, 2), (0, 1, 2, 4)), 4)


def test_flex_block_mask_matches_span_attention() -> None:
    """The BlockMask CUDA trains with, run forward by FlexAttention on CPU (torch 2.13 has no
    CPU backward), gives the same attention output as the CPU span loop, with GQA heads."""
    from torch.nn.attention.flex_attention import flex_attention

    from trainer.segment_attention import Segments, _span_attention

    # 128-token tiles: a 256-token prefix, two 128-token blocks on it, a standalone row, and
    # a short row that ends mid-tile.
    spans = ((0, 0, 0, 256), (0, 256, 256, 384), (0, 256, 384, 512), (0, 0, 512, 640))
    s = Segments((*spans, (0, 0, 640, 700)), 700)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 700, 16, generator=g)
    k = torch.randn(1, 2, 700, 16, generator=g)
    v = torch.randn(1, 2, 700, 16, generator=g)
    bm = s.block_mask(torch.device("cpu"))
    # Block sparsity: only tiles with an allowed entry are computed -- the blocks read the
    # prefix and themselves, never each other; the rows only themselves.
    tiles = bm.to_dense()[0, 0].bool()
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tiles, want)
    with pytest.warns(UserWarning):  # uncompiled flex on CPU: the dense reference kernel
        flex = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, scale=0.25)
    spans_out = _span_attention(q, k, v, s, 0.0, 0.25)
    torch.testing.assert_close(flex.transpose(1, 2), spans_out, atol=1e-5, rtol=1e-5)
    # ...and both are attention under the dense mask.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=s.dense_mask(),
        scale=0.25,
    )
    torch.testing.assert_close(spans_out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("mode", "segments"),
    [("prefix_sharing", True), ("padding", False), ("packing", True), ("packing", False)],
    ids=["prefix_sharing", "padding", "packing-segments", "packing-position-ids"],
)
def test_per_example_logprobs_equal_running_alone(setup, mode: str, segments: bool) -> None:
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    collator = CompletionCollator(
        tok.pad_token_id,
        prefix_sharing=mode == "prefix_sharing",
        packing=mode == "packing",
        segments=segments,
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


def test_segment_batch_builds_no_quadratic_mask(setup) -> None:
    """The decoder layers of a segment batch get no attention mask at all (no T x T tensor):
    the spans are the mask. A padded batch still gets SDPA's usual mask."""
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    seen: list[Any] = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        _batched(model, CompletionCollator(tok.pad_token_id, prefix_sharing=True)(rows))
        _batched(model, CompletionCollator(tok.pad_token_id)(rows))
    finally:
        hook.remove()
    assert seen[0] is None
    assert seen[1] is not None and seen[1].ndim == 4


def test_a_row_whose_first_unshared_token_is_trained_is_not_shared(setup) -> None:
    from trainer.hf_trainer import CompletionCollator

    model, tok, rows = setup
    p = rows[0]["prefix_len"]
    odd = dict(rows[1], labels=list(rows[1]["labels"]))
    odd["labels"][p] = odd["input_ids"][p]  # the prefix's last position would predict it
    batch = CompletionCollator(tok.pad_token_id, prefix_sharing=True)([rows[0], odd, rows[2]])
    prefix, b0, b2, alone = batch["segments"].spans
    # rows 0 and 2 share the prefix; the odd row stands alone, whole, after them.
    assert prefix == (0, 0, 0, p) and b0[:2] == b2[:2] == (0, p)
    assert alone == (0, 0, b2[3], b2[3] + len(odd["input_ids"]))


# --------------------------------------------------------------------------------------------
# Exactness of training: per-example losses and gradients, fast paths vs plain padding.


def _row_sets(tok: Any) -> dict[str, list[dict[str, Any]]]:
    from dataset_utils.records import Example

    def ex(schema: str, i: int, extra: str = "") -> Example:
        return Example(f"question {i}{extra}?", schema, f"SELECT a FROM t WHERE a > {i}", "t")

    long_q = " about the table and all of its columns, and then some more words"
    shared = [ex(SCHEMA_C, i) for i in range(5)] + [ex(SCHEMA_C, 5, long_q)]
    distinct = [ex(SCHEMA_A, 0), ex(SCHEMA_B, 1, long_q), ex(SCHEMA_C, 2), ex(SCHEMA_D, 3)]
    # Interleaved: groups a (3 rows), b (2), d (1), in order of first appearance a, b, d.
    mixed = [
        ex(SCHEMA_A, 0),
        ex(SCHEMA_B, 1),
        ex(SCHEMA_A, 2, long_q),
        ex(SCHEMA_D, 3),
        ex(SCHEMA_B, 4),
        ex(SCHEMA_A, 5),
    ]
    return {
        k: _tokenize(tok, v)
        for k, v in (("shared", shared), ("distinct", distinct), ("mixed", mixed))
    }


def _collated_order(rows: list[dict[str, Any]], prefix_sharing: bool) -> list[int]:
    """Row order of the completion tokens in a flattened batch: with prefix sharing, groups
    in order of first appearance, rows in input order within a group."""
    if not prefix_sharing:
        return list(range(len(rows)))
    first: dict[tuple[int, ...], int] = {}
    keys = [tuple(r["input_ids"][: r["prefix_len"]]) for r in rows]
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return sorted(range(len(rows)), key=lambda i: (first[keys[i]], i))


def _build(path: Path, method: str) -> Any:
    from transformers import AutoModelForCausalLM

    from trainer.config import LoraArgs
    from trainer.modeling import apply_adapter, peft_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    if method == "full":
        return model
    # LoRA on the top layer only (the layer below runs without grad), activation
    # checkpointing on (as `auto` does for long batches); B initialised non-zero so every
    # adapter weight gets a gradient worth comparing.
    cfg = peft_config("lora", LoraArgs(r=4, alpha=8, dropout=0.0, last_layers=1), model)
    cfg.init_lora_weights = False
    return apply_adapter(model, cfg, activation_checkpointing=True)


def _loss_and_grads(model: Any, batch: dict[str, Any], order: list[int], n_completion: list[int]):
    from trainer.hf_trainer import completion_targets

    batch = dict(batch)
    labels = batch.pop("labels")
    keep, targets = completion_targets(labels)
    out = model(**batch, logits_to_keep=keep, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    chunks = token_loss.split([n_completion[i] for i in order])
    per_example = torch.empty(len(order))
    for i, c in zip(order, chunks, strict=True):
        per_example[i] = c.mean().detach()
    loss = token_loss.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return per_example, loss.detach(), grads


@pytest.mark.parametrize("method", ["full", "lora-top-layer-checkpointed"])
@pytest.mark.parametrize("rows_kind", ["shared", "distinct", "mixed"])
@pytest.mark.parametrize("mode", ["prefix_sharing", "packing"])
def test_training_matches_padding(
    tiny_path: Path, tok: Any, row_sets: dict[str, Any], mode: str, rows_kind: str, method: str
) -> None:
    """One backward pass gives the same per-example losses, total loss and gradients with the
    fast path (shared prefix, or padding-free packing) as with plain right padding."""
    from trainer.hf_trainer import CompletionCollator
    from trainer.segment_attention import enable_segment_attention

    rows = row_sets[rows_kind]
    n_completion = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    results = []
    for fast in (False, True):
        model = _build(tiny_path, method.split("-")[0])
        model.train()
        collator = CompletionCollator(
            tok.pad_token_id,
            prefix_sharing=fast and mode == "prefix_sharing",
            packing=fast and mode == "packing",
        )
        batch = collator(rows)
        if fast:
            enable_segment_attention(model)
            assert batch["input_ids"].shape[0] == 1  # one flattened row: nothing padded
        else:
            assert batch["attention_mask"].ndim == 2 and not batch["attention_mask"].all()
        order = _collated_order(rows, fast and mode == "prefix_sharing")
        results.append(_loss_and_grads(model, batch, order, n_completion))
    (pe0, l0, g0), (pe1, l1, g1) = results
    torch.testing.assert_close(pe1, pe0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    if method != "full":
        assert all(".layers.1." in n for n in g0)  # only the top layer is adapted
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_wrapped_model_passes_segments_through(
    tiny_path: Path, tok: Any, row_sets: dict[str, Any]
) -> None:
    """Under DistributedDataParallel (gloo, one rank) the forward goes through the wrapper and
    its keyword arguments reach the attention: the same gradients as padding."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainer.hf_trainer import CompletionCollator
    from trainer.segment_attention import enable_segment_attention

    rows = row_sets["mixed"]
    n_completion = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    padded = _loss_and_grads(
        _build(tiny_path, "full"),
        CompletionCollator(tok.pad_token_id)(rows),
        list(range(len(rows))),
        n_completion,
    )
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = _build(tiny_path, "full")
        enable_segment_attention(model)
        ddp = DistributedDataParallel(model)
        batch = CompletionCollator(tok.pad_token_id, prefix_sharing=True)(rows)
        shared = _loss_and_grads(ddp, batch, _collated_order(rows, True), n_completion)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(shared[0], padded[0], atol=1e-5, rtol=1e-5)
    for name, g in padded[2].items():
        torch.testing.assert_close(shared[2]["module." + name], g, atol=1e-5, rtol=1e-4)


def test_trainer_switches_the_model_and_refuses_segments_without_it(
    tiny_path: Path, tok: Any, row_sets: dict[str, Any]
) -> None:
    from transformers import AutoModelForCausalLM, TrainingArguments

    from trainer.hf_trainer import CompletionCollator, Text2SqlTrainer
    from trainer.segment_attention import SEGMENT_ATTENTION

    rows = row_sets["shared"]
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa")
    trainer = Text2SqlTrainer(
        model=model,
        args=args,
        data_collator=CompletionCollator(tok.pad_token_id, prefix_sharing=True),
    )
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    batch = trainer.data_collator(rows)
    assert trainer.compute_loss(model, batch) > 0
    model.set_attn_implementation("sdpa")  # plain SDPA would let the rows see each other
    with pytest.raises(ValueError, match="segment attention"):
        trainer.compute_loss(model, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["prefix_sharing", "packing"])
def test_flex_attention_training_matches_padding_on_gpu(
    tiny_path: Path, tok: Any, row_sets: dict[str, Any], mode: str
) -> None:
    """On CUDA segment attention runs FlexAttention with the spans' BlockMask (forward and
    backward): the same per-example losses and gradients as padding, fp32."""
    from trainer.hf_trainer import CompletionCollator
    from trainer.segment_attention import enable_segment_attention

    rows = row_sets["mixed"]
    n_completion = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    results = []
    for fast in (False, True):
        model = _build(tiny_path, "full").cuda()
        collator = CompletionCollator(
            tok.pad_token_id,
            prefix_sharing=fast and mode == "prefix_sharing",
            packing=fast and mode == "packing",
        )
        batch = {
            k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collator(rows).items()
        }
        if fast:
            enable_segment_attention(model)
        order = _collated_order(rows, fast and mode == "prefix_sharing")
        results.append(_loss_and_grads(model, batch, order, n_completion))
    assert results[1][0].device.type == "cpu"
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, g in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], g, atol=1e-5, rtol=1e-4, msg=name)


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
