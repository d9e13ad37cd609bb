"""Chat formats and tokenization with completion-only labels -- all model-specific knowledge.

Three prompt formats (``chat_format``):

- ``chatml``: ``<|im_start|>role\\n...<|im_end|>`` turns (SmolLM2, TinyLlama-Chat v0.x, Qwen).
  The end-of-turn token is ``<|im_end|>``.
- ``tokenizer``: the tokenizer's own chat template (Mistral-Instruct, Llama-3-Instruct...). The
  end-of-turn token is whatever special token the template puts right after the answer
  (``</s>``, ``<|eot_id|>``...).
- ``plain``: an instruction template for base models, in the MLflow QLoRA tutorial's
  ``### Table / ### Question / ### Response`` style, ending with the tokenizer's EOS.
- ``auto``: ``tokenizer`` when the tokenizer has a chat template, else ``plain``.

`tokenize_examples` returns ``input_ids``, ``attention_mask`` and ``labels`` where every
prompt token is -100 and the answer *plus its end-of-turn token* is trained, so the model learns
to stop. Labels are built from positions, never by comparing ids with ``pad_token_id``: many
tokenizers (SmolLM2 included) use the end-of-turn token as padding, and masking "pad" ids would
silently stop training the stop token.

The prompt is tokenized exactly as generation will see it (`encode_prompts`), and the answer is
tokenized on its own and appended, so training and inference agree token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataset_utils.errors import UserError
from dataset_utils.records import Example

CHAT_FORMATS = ("auto", "chatml", "tokenizer", "plain")
IGNORE_INDEX = -100

SYSTEM_PROMPT = (
    "You are a text-to-SQL assistant. Given a database schema and a question, "
    "answer with one SQLite query and nothing else."
)
PLAIN_TEMPLATE = (
    "You are a powerful text-to-SQL model. Given the SQL tables and natural language question, "
    "your job is to write SQL query that answers the question.\n\n"
    "### Table:\n{context}\n\n### Question:\n{question}\n\n### Response:\n"
)
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class TokenizerLike(Protocol):
    eos_token: str | None
    bos_token_id: int | None
    chat_template: str | None

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def convert_tokens_to_ids(self, tokens: Any) -> Any: ...


def user_message(example: Example) -> str:
    return f"Schema:\n{example.context}\n\nQuestion: {example.question}"


def messages_for(example: Example, *, with_answer: bool = True) -> list[dict[str, str]]:
    msgs = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(example)},
    ]
    if with_answer:
        msgs.append({"role": "assistant", "content": example.sql})
    return msgs


def resolve_chat_format(chat_format: str, tokenizer: TokenizerLike) -> str:
    if chat_format not in CHAT_FORMATS:
        raise UserError(
            f"unknown chat format {chat_format!r}; expected one of {', '.join(CHAT_FORMATS)}"
        )
    if chat_format == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"
    if chat_format == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise UserError("chat_format 'tokenizer' needs a tokenizer with a chat template")
    if chat_format == "chatml":
        ids = tokenizer.convert_tokens_to_ids([CHATML_START, CHATML_END])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unk for i in ids):
            raise UserError(
                "chat_format 'chatml' needs <|im_start|>/<|im_end|> in the tokenizer's "
                "vocabulary; set model.add_chatml_tokens: true to add them (the embeddings "
                "are then trained)"
            )
    return chat_format


def _fold_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Merge the system turn into the first user turn (for templates without system turns)."""
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    return [
        {"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]},
        *msgs[2:],
    ]


def _template_render(
    tokenizer: TokenizerLike, msgs: list[dict[str, str]], gen: bool, fold_system: bool = False
) -> str:
    if fold_system:
        msgs = _fold_system(msgs)
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 - jinja TemplateError: template refuses system turns
        if fold_system:
            raise
        # Some templates (Mistral v0.1-0.2) reject a system turn; fold it into the user turn.
        return tokenizer.apply_chat_template(
            _fold_system(msgs), tokenize=False, add_generation_prompt=gen
        )


@dataclass(frozen=True)
class FormatPlan:
    """How to render one format: prompt text, text before/after the answer, end-of-turn."""

    chat_format: str
    answer_prefix: str  # text the template puts between the prompt and the answer
    end_of_turn: str  # the special token trained after the answer
    add_bos: bool  # prepend BOS to the prompt ids (plain format on BOS tokenizers)
    # ``tokenizer`` format only: send the system prompt inside the user turn. Needed where the
    # template places the system turn differently depending on whether an answer follows
    # (Mistral v0.3 emits it only when the *last* message is a user turn).
    fold_system: bool = False


def plan_format(chat_format: str, tokenizer: TokenizerLike) -> FormatPlan:
    fmt = resolve_chat_format(chat_format, tokenizer)
    if fmt == "chatml":
        return FormatPlan(fmt, "", CHATML_END, add_bos=False)
    if fmt == "plain":
        if not tokenizer.eos_token:
            raise UserError("plain chat format needs a tokenizer with an EOS token")
        return FormatPlan(fmt, "", tokenizer.eos_token, add_bos=tokenizer.bos_token_id is not None)
    # The tokenizer's own template: render a probe conversation and read off what surrounds
    # the answer, so any template (Mistral's " answer</s>", Llama-3's "answer<|eot_id|>")
    # is handled without model-specific branches.
    probe = Example(question="q?", context="CREATE TABLE t (a INT)", sql="SELECT 1729", source="x")
    # Keep the system turn where the template renders it consistently (the prompt is a prefix
    # of the full conversation, and the system prompt is in it); else fold it into the user turn.
    for fold_system in (False, True):
        try:
            prompt = _template_render(
                tokenizer, messages_for(probe, with_answer=False), True, fold_system
            )
            full = _template_render(tokenizer, messages_for(probe), False, fold_system)
        except Exception:  # noqa: BLE001 - jinja errors: this variant is not usable
            continue
        if full.startswith(prompt) and SYSTEM_PROMPT in prompt:
            break
    else:
        raise UserError(
            "the tokenizer's chat template renders the prompt differently with and without the "
            "answer; use chat_format 'chatml' or 'plain'"
        )
    rest = full[len(prompt) :]
    at = rest.find(probe.sql)
    if at < 0:
        raise UserError("the tokenizer's chat template drops the assistant answer")
    prefix, suffix = rest[:at], rest[at + len(probe.sql) :]
    specials = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    end = next((s for s in specials if s and suffix.lstrip(" ").startswith(s)), None)
    if end is None:
        end = tokenizer.eos_token or ""
    if not end:
        raise UserError("cannot find the chat template's end-of-turn token")
    return FormatPlan(fmt, prefix, end, add_bos=False, fold_system=fold_system)


def render_prompt(example: Example, tokenizer: TokenizerLike, plan: FormatPlan) -> str:
    """The text the model is conditioned on; generation continues right after it."""
    if plan.chat_format == "chatml":
        parts = [
            f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n"
            for m in messages_for(example, with_answer=False)
        ]
        return "".join(parts) + f"{CHATML_START}assistant\n"
    if plan.chat_format == "plain":
        return PLAIN_TEMPLATE.format(context=example.context, question=example.question)
    return _template_render(
        tokenizer, messages_for(example, with_answer=False), True, plan.fold_system
    )


def render_completion(example: Example, plan: FormatPlan) -> str:
    """The trained text: the gold SQL and the end-of-turn token."""
    return f"{plan.answer_prefix}{example.sql}{plan.end_of_turn}"


def schema_cut(text: str, example: Example) -> int:
    """Where the shared part of a prompt ends: right after the schema (0 when not found)."""
    if not example.context:
        return 0
    at = text.find(example.context)
    return at + len(example.context) if at >= 0 else 0


def encode_prompt_parts(
    examples: Sequence[Example], tokenizer: TokenizerLike, plan: FormatPlan
) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids and, per prompt, how many leading ids are the shared prefix.

    The prompt is tokenized in two pieces -- everything up to the end of the schema, then the
    rest (question and assistant header) -- so that every question asked about the same schema
    starts with *identical* ids. Training can then compute that prefix once for many questions
    (`trainer.hf_trainer.CompletionCollator` with ``prefix_sharing``). Generation uses the same
    function, so training and inference see the same ids.
    """
    texts = [render_prompt(e, tokenizer, plan) for e in examples]
    cuts = [schema_cut(t, e) for t, e in zip(texts, examples, strict=True)]
    heads = tokenizer([t[:c] for t, c in zip(texts, cuts, strict=True)], add_special_tokens=False)[
        "input_ids"
    ]
    tails = tokenizer([t[c:] for t, c in zip(texts, cuts, strict=True)], add_special_tokens=False)[
        "input_ids"
    ]
    bos = [tokenizer.bos_token_id] if plan.add_bos and tokenizer.bos_token_id is not None else []
    ids = [[*bos, *h, *t] for h, t in zip(heads, tails, strict=True)]
    return ids, [len(bos) + len(h) for h in heads]


def encode_prompts(
    examples: Sequence[Example], tokenizer: TokenizerLike, plan: FormatPlan
) -> list[list[int]]:
    """Prompt token ids exactly as used for both training and generation."""
    return encode_prompt_parts(examples, tokenizer, plan)[0]


@dataclass
class Tokenized:
    """Columns ready for the Trainer, plus what the length policy dropped."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]
    kept: list[int]  # indices into the input examples that survived the length policy
    dropped_too_long: int
    prefix_len: list[int] = field(default_factory=list)  # ids shared by prompts on one schema

    def as_columns(self) -> dict[str, list[Any]]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "prefix_len": self.prefix_len,
        }


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: TokenizerLike,
    plan: FormatPlan,
    max_length: int | None,
) -> Tokenized:
    """Tokenize with completion-only labels. Rows longer than ``max_length`` are dropped and
    counted -- an answer is never cut."""
    if not examples:  # an empty split (e.g. test: 0.0 and no test source); fast tokenizers
        return Tokenized([], [], [], [], 0)  # raise IndexError on an empty batch
    prompts, prefix = encode_prompt_parts(examples, tokenizer, plan)
    completions = tokenizer(
        [render_completion(e, plan) for e in examples], add_special_tokens=False
    )["input_ids"]
    out = Tokenized([], [], [], [], 0)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        if max_length is not None and n > max_length:
            out.dropped_too_long += 1
            continue
        out.input_ids.append(p + list(c))
        out.attention_mask.append([1] * n)
        out.labels.append([IGNORE_INDEX] * len(p) + list(c))
        out.prefix_len.append(prefix[i])
        out.kept.append(i)
    return out


def tokenize_example(
    example: Example, tokenizer: TokenizerLike, plan: FormatPlan, max_length: int | None = None
) -> dict[str, list[int]] | None:
    """One example: ``input_ids, attention_mask, labels``; None when over ``max_length``."""
    t = tokenize_examples([example], tokenizer, plan, max_length)
    if not t.input_ids:
        return None
    return {
        "input_ids": t.input_ids[0],
        "attention_mask": t.attention_mask[0],
        "labels": t.labels[0],
    }
