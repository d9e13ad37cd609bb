"""The prefix-sharing greedy engine returns exactly what one-at-a-time generation returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from dataset_utils.formatting import plan_format
    from dataset_utils.records import Example

    path = tiny.make_tiny_model(tmp_path_factory.mktemp("g") / "tiny")
    tok = tiny.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    schema_a = "CREATE TABLE singer (name TEXT, age INT, country TEXT)"
    schema_b = "CREATE TABLE head (age INTEGER, name TEXT, born_state TEXT)"
    questions_a = [
        "How many singers?",
        "Names of singers over 30?",
        "Countries?",
        "Which singer is the oldest of all the singers in the table?",
    ]
    questions_b = ["How many heads are older than 56?", "List names.", "States?"]
    examples = [Example(q, schema_a, "SELECT 1", "t") for q in questions_a]
    examples += [Example(q, schema_b, "SELECT 1", "t") for q in questions_b]
    examples.append(Example("No schema at all?", "", "SELECT 1", "t"))
    return model, tok, plan_format("chatml", tok), examples


def _one_at_a_time(model, tok, plan, examples, n):
    from evaluation.generation import generate_sql

    return [
        generate_sql(
            model, tok, [e], plan, batch_size=1, max_new_tokens=n, progress=False, engine="hf"
        ).raw[0]
        for e in examples
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_prefix_engine_equals_one_at_a_time(setup, batch_size: int) -> None:
    from evaluation.generation import generate_sql

    model, tok, plan, examples = setup
    want = _one_at_a_time(model, tok, plan, examples, 12)
    got = generate_sql(
        model,
        tok,
        examples,
        plan,
        batch_size=batch_size,
        max_new_tokens=12,
        progress=False,
        engine="prefix",
    )
    assert got.raw == want
    assert got.new_tokens > 0


def test_rows_stop_at_their_own_stop_token(setup) -> None:
    """A row that stops early must not keep generating while longer rows run on."""
    from dataset_utils.formatting import encode_prompt_parts
    from evaluation.generation import _prefix_cached_greedy, stop_token_ids

    model, tok, plan, examples = setup
    prompts, prefix = encode_prompt_parts(examples, tok, plan)
    # Make every token a "stop" for row outputs: each row then emits exactly one token.
    first = _prefix_cached_greedy(
        model,
        prompts,
        prefix,
        list(range(len(tok))),
        batch_size=8,
        max_new_tokens=5,
        progress=False,
        desc="",
    )
    assert all(t == [] for t in first)  # the stop token itself is cut
    stops = stop_token_ids(tok, plan)
    out = _prefix_cached_greedy(
        model, prompts, prefix, stops, batch_size=8, max_new_tokens=5, progress=False, desc=""
    )
    assert all(len(t) <= 5 and not set(t) & set(stops) for t in out)


def test_peft_adapter_model_matches(setup, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from evaluation.generation import generate_sql

    model, tok, plan, examples = setup
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    try:
        want = _one_at_a_time(peft_model, tok, plan, examples[:5], 8)
        got = generate_sql(
            peft_model,
            tok,
            examples[:5],
            plan,
            batch_size=4,
            max_new_tokens=8,
            progress=False,
            engine="prefix",
        )
        assert got.raw == want
    finally:
        peft_model.unload()
