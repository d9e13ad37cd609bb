"""Batched greedy SQL generation for base and fine-tuned models.

Prompts are encoded exactly as in training (`dataset_utils.formatting.encode_prompt_parts`)
and decoded greedily with the KV cache on (a model trained with activation checkpointing has
``config.use_cache = False``; generation forces it back on, otherwise every new token re-reads
the whole prompt). Generation stops at the format's end-of-turn token or EOS. Outputs come back
in input order, as raw text and as SQL after post-processing (code fences, first statement).

Two engines:

- ``prefix`` (default): our own greedy loop built for CPU text-to-SQL evaluation. Questions
  about the same schema share their prompt prefix (system prompt + schema), so its KV cache is
  computed once per schema and reused by every question; batches mix schemas (each row's
  prefix left-padded in the cache); rows leave the batch as soon as they emit a stop token, so
  a batch costs what its rows need, not what its longest row needs. Measured here it is
  several times faster than one-at-a-time generation (benchmarks/generation_bench.py).
- ``hf``: ``model.generate`` with left padding -- used when the model is sharded by ZeRO-3
  (``synced_gpus``) or does not use a standard cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dataset_utils.formatting import FormatPlan, encode_prompt_parts
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
    engine: str = "auto",
) -> Generation:
    """Greedy-decode one SQL answer per example (see the module docstring)."""
    from evaluation.postprocess import extract_sql

    prompts, prefix_lens = encode_prompt_parts(examples, tokenizer, plan)
    stops = stop_token_ids(tokenizer, plan)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if engine == "auto":
        engine = "hf" if synced_gpus or repetition_penalty != 1.0 else "prefix"
    start = time.perf_counter()
    if engine == "prefix":
        new_tokens = _prefix_cached_greedy(
            model, prompts, prefix_lens, stops, batch_size=batch_size,
            max_new_tokens=max_new_tokens, progress=progress, desc=desc,
        )
    else:
        new_tokens = _hf_generate(
            model, prompts, stops, pad_id, batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=progress, desc=desc, synced_gpus=synced_gpus,
            repetition_penalty=repetition_penalty,
        )
    raw = [tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
    return Generation(
        raw=raw,
        sql=[extract_sql(r) for r in raw],
        seconds=time.perf_counter() - start,
        new_tokens=sum(len(t) for t in new_tokens),
    )


def _cut(tokens: list[int], stops: Sequence[int]) -> list[int]:
    return tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]


def _prefix_cached_greedy(
    model: Any,
    prompts: list[list[int]],
    prefix_lens: list[int],
    stops: Sequence[int],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    desc: str,
) -> list[list[int]]:
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    # 1. One forward pass per distinct prefix (schema) -> its per-layer keys/values.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, p) in enumerate(zip(prompts, prefix_lens, strict=True)):
        # The suffix must keep at least one token: the next-token logits come from it.
        p = min(p, len(ids) - 1)
        groups.setdefault(tuple(ids[:p]), []).append(i)
    prefix_kv: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    stop_t = torch.tensor(list(stops), device=device)
    with inference_mode(model):
        for prefix in groups:
            if not prefix:
                prefix_kv[prefix] = []
                continue
            cache = DynamicCache()
            model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
            prefix_kv[prefix] = [(layer.keys, layer.values) for layer in cache.layers]
        # 2. Batches of similar total length, mixing schemas.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        key_of = {i: k for k, members in groups.items() for i in members}
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            pre = [key_of[i] for i in rows]
            pmax = max(len(p) for p in pre)
            sfx = [prompts[i][len(p) :] for i, p in zip(rows, pre, strict=True)]
            smax = max(len(x) for x in sfx)
            n = len(rows)
            mask = torch.zeros((n, pmax + smax), dtype=torch.long, device=device)
            ids = torch.zeros((n, smax), dtype=torch.long, device=device)
            for r, (p, x) in enumerate(zip(pre, sfx, strict=True)):
                mask[r, pmax - len(p) : pmax] = 1
                mask[r, pmax + smax - len(x) :] = 1
                ids[r, smax - len(x) :] = torch.tensor(x, device=device)
            cache = DynamicCache()
            if pmax:
                n_layers = len(next(kv for kv in prefix_kv.values() if kv))
                data = []
                for layer in range(n_layers):
                    ks, vs = [], []
                    for p in pre:
                        kv = prefix_kv[p]
                        if kv:
                            k, v = kv[layer]
                        else:  # no prefix: an all-padding cache row
                            ref_k, ref_v = next(x for x in prefix_kv.values() if x)[layer]
                            k = ref_k.new_zeros(ref_k.shape[:2] + (0,) + ref_k.shape[3:])
                            v = ref_v.new_zeros(ref_v.shape[:2] + (0,) + ref_v.shape[3:])
                        padk = k.new_zeros(k.shape[:2] + (pmax - k.shape[2],) + k.shape[3:])
                        padv = v.new_zeros(v.shape[:2] + (pmax - v.shape[2],) + v.shape[3:])
                        ks.append(torch.cat([padk, k], dim=2))
                        vs.append(torch.cat([padv, v], dim=2))
                    data.append((torch.cat(ks), torch.cat(vs)))
                cache = DynamicCache(ddp_cache_data=data)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions[:, pmax:],
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1]
            alive = torch.arange(n, device=device)
            last_pos = positions[:, -1]
            for _step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                for r, t in zip(alive.tolist(), nxt.tolist(), strict=True):
                    out[rows[r]].append(t)
                done = torch.isin(nxt, stop_t)
                if bool(done.all()) or _step == max_new_tokens - 1:
                    break
                if bool(done.any()):
                    keep = (~done).nonzero()[:, 0]
                    alive, nxt, mask, last_pos = alive[keep], nxt[keep], mask[keep], last_pos[keep]
                    cache.batch_select_indices(keep)
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                last_pos = last_pos + 1
                logits = model(
                    input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True,
                ).logits[:, -1]
            bar.update(n)
    bar.close()
    return [_cut(t, stops) for t in out]


def _hf_generate(
    model: Any,
    prompts: list[list[int]],
    stops: Sequence[int],
    pad_id: int,
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    desc: str,
    synced_gpus: bool,
    repetition_penalty: float,
) -> list[list[int]]:
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
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
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=list(stops),
                pad_token_id=pad_id,
                synced_gpus=synced_gpus,
                repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = gen[:, width:].tolist()
            for row, i in enumerate(idx):
                out[i] = _cut(new[row], stops)
            bar.update(len(idx))
    bar.close()
    return out
