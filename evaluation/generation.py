"""Batched greedy SQL generation for base and fine-tuned models.

Prompts are encoded exactly as in training (`dataset_utils.formatting.encode_prompts`), sorted
by length so each batch holds similar lengths, left-padded, and decoded greedily with the KV
cache on (a model trained with activation checkpointing has ``config.use_cache = False``;
generation forces it back on, otherwise every new token re-reads the whole prompt). Generation
stops at the format's end-of-turn token or EOS. Outputs are returned in input order, as raw
text and as SQL after post-processing (code fences, first statement only).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dataset_utils.formatting import FormatPlan, encode_prompts
from dataset_utils.records import Example


@dataclass
class Generation:
    raw: list[str]
    sql: list[str]
    seconds: float
    new_tokens: int


def stop_token_ids(tokenizer: Any, plan: FormatPlan) -> list[int]:
    ids = []
    for tok in (plan.end_of_turn, tokenizer.eos_token):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != getattr(tokenizer, "unk_token_id", None) and i not in ids:
                ids.append(i)
    return ids


@contextlib.contextmanager
def inference_mode(model: Any) -> Iterator[None]:
    """eval() + no_grad + KV cache on, restoring the previous state afterwards."""
    import torch

    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if config is not None and old_cache is not None:
            config.use_cache = old_cache
        if was_training:
            model.train()


def generate_sql(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    plan: FormatPlan,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 160,
    progress: bool = True,
    desc: str = "generating",
    synced_gpus: bool = False,
    repetition_penalty: float = 1.0,
) -> Generation:
    """Greedy-decode one SQL answer per example (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from evaluation.postprocess import extract_sql

    prompts = encode_prompts(examples, tokenizer, plan)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_token_ids(tokenizer, plan)[0]
    stops = stop_token_ids(tokenizer, plan)
    device = next(model.parameters()).device
    raw: list[str] = [""] * len(prompts)
    n_new = 0
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    with inference_mode(model):
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=stops,
                pad_token_id=pad_id,
                synced_gpus=synced_gpus,
                repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                # Cut at the first stop token; the rest of the row is padding.
                cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
                n_new += cut
                raw[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True)
            bar.update(len(idx))
    bar.close()
    return Generation(
        raw=raw,
        sql=[extract_sql(r) for r in raw],
        seconds=time.perf_counter() - start,
        new_tokens=n_new,
    )
