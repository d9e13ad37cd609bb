"""Batched SQL generation for base and fine-tuned models: greedy, or beam search.

Prompts are encoded exactly as in training (`dataset_utils.formatting.encode_prompt_parts`)
and decoded with the KV cache on (a model trained with activation checkpointing has
``config.use_cache = False``; generation forces it back on, otherwise every new token re-reads
the whole prompt). Generation stops at the format's end-of-turn token or EOS. Outputs come back
in input order, as raw text and as SQL after post-processing (code fences, first statement).

Two engines:

- ``prefix`` (default): our own decoding loop built for CPU text-to-SQL evaluation. Questions
  about the same schema share their prompt prefix (system prompt + schema), so its KV cache is
  computed once per schema and reused by every question; batches mix schemas (each row's
  prefix left-padded in the cache); rows leave the batch as soon as they emit a stop token, so
  a batch costs what its rows need, not what its longest row needs. Measured here it is
  several times faster than one-at-a-time generation (benchmarks/generation_bench.py).
  With ``num_beams = k > 1`` the same engine runs beam search (`_prefix_cached_beam`, the
  rules of ``generate``'s): a question's prompt is still encoded once, on its cached schema,
  and its cache rows are copied to its k beams after the first token.
- ``hf``: ``model.generate`` with left padding -- used when the model is sharded by ZeRO-3
  (``synced_gpus``) or does not use a standard cache, or with a repetition penalty.

Decoding options (`trainer.config.DecodingArgs`, passed flat): ``num_beams``;
``schema_constrained`` (`evaluation.schema_constraint` masks the scores before each token is
chosen, in both engines); ``execution_guided`` (`evaluation.execution_guided` picks one of the
k candidates by running them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from dataset_utils.formatting import FormatPlan, encode_prompt_parts
from dataset_utils.records import Example
from evaluation.execution_guided import choose_candidate
from evaluation.postprocess import extract_sql
from evaluation.schema_constraint import SchemaConstraint

if TYPE_CHECKING:
    from evaluation.schema_constraint import SchemaConstraint

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """What `generate_sql` returns, in input order.

    ``candidates``: with beam search, each example's k candidate SQL queries, best-ranked
    first; ``chosen``: with execution guidance, the index of the candidate taken (else None).
    ``new_tokens`` counts the tokens of the returned answers.
    """

    raw: list[str]
    sql: list[str]
    seconds: float
    new_tokens: int
    candidates: list[list[str]] | None = None
    chosen: list[int] | None = None


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
    num_beams: int = 1,
    execution_guided: bool = False,
    schema_constrained: bool = False,
    timeout_s: float = 2.0,
) -> Generation:
    """Decode one SQL answer per example (see the module docstring).

    ``num_beams``, ``execution_guided`` and ``schema_constrained`` are the decoding options of
    `trainer.config.DecodingArgs` (pass ``**asdict(decoding)``); ``timeout_s`` bounds each
    candidate's execution when ``execution_guided``.
    """
    if execution_guided and num_beams < 2:
        raise ValueError("execution_guided needs num_beams >= 2")
    prompts, prefix_lens = encode_prompt_parts(examples, tokenizer, plan)
    stops = stop_token_ids(tokenizer, plan)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if engine == "auto":
        engine = "hf" if synced_gpus or repetition_penalty != 1.0 else "prefix"
    constraint = None
    contexts = [(e.context, e.db_path) for e in examples]
    if schema_constrained:
        constraint = SchemaConstraint(tokenizer, stops)
        free = sum(1 for c, d in contexts if constraint.initial_state(c, d)[0] is None)
        if free:
            logger.warning(
                "schema_constrained: %d of %d prompts show no CREATE TABLE the constraint can "
                "read; they are decoded unconstrained",
                free,
                len(contexts),
            )
    start = time.perf_counter()
    if engine == "prefix" and num_beams == 1:
        found = [
            [t]
            for t in _prefix_cached_greedy(
                model,
                prompts,
                prefix_lens,
                stops,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
                desc=desc,
                constraint=constraint,
                contexts=contexts,
            )
        ]
    elif engine == "prefix":
        found = _prefix_cached_beam(
            model,
            prompts,
            prefix_lens,
            stops,
            num_beams=num_beams,
            batch_size=max(1, batch_size // num_beams),
            max_new_tokens=max_new_tokens,
            progress=progress,
            desc=desc,
            constraint=constraint,
            contexts=contexts,
        )
    else:
        found = _hf_generate(
            model,
            prompts,
            stops,
            pad_id,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
            desc=desc,
            synced_gpus=synced_gpus,
            repetition_penalty=repetition_penalty,
            num_beams=num_beams,
            constraint=constraint,
            contexts=contexts,
        )
    raw_candidates = [
        [tokenizer.decode(t, skip_special_tokens=True) for t in cands] or [""] for cands in found
    ]
    sql_candidates = [[extract_sql(r) for r in cands] for cands in raw_candidates]
    chosen = [0] * len(examples)
    if execution_guided:
        chosen = [
            choose_candidate(ex, cands, timeout_s=timeout_s)
            for ex, cands in zip(examples, sql_candidates, strict=True)
        ]
    return Generation(
        raw=[c[i] for c, i in zip(raw_candidates, chosen, strict=True)],
        sql=[c[i] for c, i in zip(sql_candidates, chosen, strict=True)],
        seconds=time.perf_counter() - start,
        new_tokens=sum(len(c[i]) if c else 0 for c, i in zip(found, chosen, strict=True)),
        candidates=sql_candidates if num_beams > 1 else None,
        chosen=chosen if execution_guided else None,
    )


def _cut(tokens: list[int], stops: Sequence[int]) -> list[int]:
    return tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]


class _PrefixCache:
    """Each distinct prompt prefix (system prompt + schema) encoded once; batches built on it."""

    def __init__(self, model: Any, prompts: list[list[int]], prefix_lens: list[int]) -> None:
        import torch
        from transformers import DynamicCache

        self.model = model
        self.prompts = prompts
        self.device = next(model.parameters()).device
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, p) in enumerate(zip(prompts, prefix_lens, strict=True)):
            # The suffix must keep at least one token: the next-token logits come from it.
            p = min(p, len(ids) - 1)
            groups.setdefault(tuple(ids[:p]), []).append(i)
        self.key_of = {i: k for k, members in groups.items() for i in members}
        self.kv: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
        for prefix in groups:
            if not prefix:
                self.kv[prefix] = []
                continue
            cache = DynamicCache()
            model(
                input_ids=torch.tensor([prefix], device=self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.kv[prefix] = [(layer.keys, layer.values) for layer in cache.layers]

    def order(self) -> list[int]:
        """Prompt indices longest first, so a batch holds similar total lengths."""
        return sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]), reverse=True)

    def prefill(self, rows: list[int]) -> tuple[Any, Any, Any, Any]:
        """Encode the suffixes of ``rows`` on their cached prefixes (left-padded, mixed schemas).

        Returns the next-token logits (rows x vocab), the cache, the attention mask and each
        row's last position id.
        """
        import torch
        from transformers import DynamicCache

        device = self.device
        pre = [self.key_of[i] for i in rows]
        pmax = max(len(p) for p in pre)
        sfx = [self.prompts[i][len(p) :] for i, p in zip(rows, pre, strict=True)]
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
            n_layers = len(next(kv for kv in self.kv.values() if kv))
            data = []
            for layer in range(n_layers):
                ks, vs = [], []
                for p in pre:
                    kv = self.kv[p]
                    if kv:
                        k, v = kv[layer]
                    else:  # no prefix: an all-padding cache row
                        ref_k, ref_v = next(x for x in self.kv.values() if x)[layer]
                        k = ref_k.new_zeros(ref_k.shape[:2] + (0,) + ref_k.shape[3:])
                        v = ref_v.new_zeros(ref_v.shape[:2] + (0,) + ref_v.shape[3:])
                    padk = k.new_zeros(k.shape[:2] + (pmax - k.shape[2],) + k.shape[3:])
                    padv = v.new_zeros(v.shape[:2] + (pmax - v.shape[2],) + v.shape[3:])
                    ks.append(torch.cat([padk, k], dim=2))
                    vs.append(torch.cat([padv, v], dim=2))
                data.append((torch.cat(ks), torch.cat(vs)))
            cache = DynamicCache(ddp_cache_data=data)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, pmax:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return logits, cache, mask, positions[:, -1]

    def step(self, tokens: Any, cache: Any, mask: Any, last_pos: Any) -> tuple[Any, Any, Any]:
        """Feed one token per row; returns (logits, mask, last_pos) for the next step."""
        mask = torch_cat_ones(mask)
        last_pos = last_pos + 1
        logits = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        return logits, mask, last_pos


def torch_cat_ones(mask: Any) -> Any:
    import torch

    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)


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
    constraint: SchemaConstraint | None = None,
    contexts: Sequence[tuple[str, str | None]] | None = None,
) -> list[list[int]]:
    import torch

    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    with inference_mode(model):
        engine = _PrefixCache(model, prompts, prefix_lens)
        stop_t = torch.tensor(list(stops), device=engine.device)
        order = engine.order()
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            n = len(rows)
            logits, cache, mask, last_pos = engine.prefill(rows)
            alive = torch.arange(n, device=engine.device)
            states = (
                [constraint.initial_state(*contexts[i]) for i in rows]  # type: ignore[index]
                if constraint is not None
                else []
            )
            for _step in range(max_new_tokens):
                if constraint is not None:
                    logits = constraint.mask(logits, [states[r] for r in alive.tolist()], 1)
                nxt = logits.argmax(-1)
                for r, t in zip(alive.tolist(), nxt.tolist(), strict=True):
                    out[rows[r]].append(t)
                    if constraint is not None:
                        states[r] = constraint.advance(states[r], t) or states[r]
                done = torch.isin(nxt, stop_t)
                if bool(done.all()) or _step == max_new_tokens - 1:
                    break
                if bool(done.any()):
                    keep = (~done).nonzero()[:, 0]
                    alive, nxt, mask, last_pos = alive[keep], nxt[keep], mask[keep], last_pos[keep]
                    cache.batch_select_indices(keep)
                logits, mask, last_pos = engine.step(nxt, cache, mask, last_pos)
            bar.update(n)
    bar.close()
    return [_cut(t, stops) for t in out]


def _prefix_cached_beam(
    model: Any,
    prompts: list[list[int]],
    prefix_lens: list[int],
    stops: Sequence[int],
    *,
    num_beams: int,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    desc: str,
    constraint: SchemaConstraint | None = None,
    contexts: Sequence[tuple[str, str | None]] | None = None,
) -> list[list[list[int]]]:
    """Beam search on the prefix cache; per prompt, up to k finished hypotheses, best first.

    Same rules as ``model.generate(num_beams=k, early_stopping=True, length_penalty=1.0)``
    (tested against it): each step keeps the best ``max(2, 1 + #stops) * k`` continuations
    over all of a prompt's beams; a stop token among the top k finishes a hypothesis, scored
    by its summed log-probability / its length (stop token included); the best k non-stopped
    continuations run on; a prompt is done when it has k hypotheses (then it leaves the batch)
    or at ``max_new_tokens`` (its best continuations then count as finished). Unlike
    ``generate``, the prompt is encoded once (on its cached schema prefix), not k times: its
    cache rows are copied to the k beams after the first token.
    """
    import torch

    k = num_beams
    keep_n = max(2, 1 + len(stops)) * k
    results: list[list[list[int]]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    with inference_mode(model):
        engine = _PrefixCache(model, prompts, prefix_lens)
        device = engine.device
        stop_t = torch.tensor(list(stops), device=device)
        order = engine.order()
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            logits, cache, mask, last_pos = engine.prefill(rows)
            hyps: list[list[tuple[float, list[int]]]] = [[] for _ in rows]
            alive = list(range(len(rows)))  # batch positions of prompts still searching
            width = 1  # beams per alive prompt in the cache (k after the first token)
            seqs: list[list[int]] = [[] for _ in rows]
            states: list[Any] = (
                [constraint.initial_state(*contexts[i]) for i in rows]  # type: ignore[index]
                if constraint is not None
                else []
            )
            beam_scores = torch.zeros((len(rows), 1), device=device)
            for step in range(max_new_tokens):
                logp = torch.log_softmax(logits.float(), dim=-1)
                if constraint is not None:
                    logp = constraint.mask(logp, states, keep_n)
                vocab = logp.shape[-1]
                na = len(alive)
                acc = (logp.view(na, width, vocab) + beam_scores[:, :, None]).view(na, -1)
                top_v, top_i = acc.topk(min(keep_n, acc.shape[-1]))
                src, tok = top_i // vocab, top_i % vocab
                last = step == max_new_tokens - 1
                is_stop = torch.isin(tok, stop_t) | last
                run_v = top_v + is_stop.float() * -1.0e9
                run_v, run_rank = run_v.topk(k)
                tv, tl, sl, il = top_v.tolist(), tok.tolist(), src.tolist(), is_stop.tolist()
                next_alive: list[int] = []
                sel: list[int] = []  # cache row of each continuing beam
                next_seqs: list[list[int]] = []
                next_states: list[Any] = []
                next_scores: list[Any] = []
                next_tok: list[int] = []
                for a, p in enumerate(alive):
                    for j in range(min(k, len(tl[a]))):  # finished: only among the top k
                        score = tv[a][j]
                        if il[a][j] and score > -1.0e8:
                            row = a * width + sl[a][j]
                            t = tl[a][j]
                            tokens = seqs[row] + ([] if t in stops else [t])
                            hyps[p].append((score / (step + 1), tokens))
                    hyps[p].sort(key=lambda h: -h[0])
                    del hyps[p][k:]
                    if last or len(hyps[p]) >= k:
                        continue
                    next_alive.append(p)
                    for j in run_rank[a].tolist():
                        row = a * width + sl[a][j]
                        t = tl[a][j]
                        sel.append(row)
                        next_seqs.append(seqs[row] + [t])
                        next_tok.append(t)
                        if constraint is not None:
                            next_states.append(constraint.advance(states[row], t) or states[row])
                    next_scores.append(run_v[a])
                if not next_alive:
                    break
                sel_t = torch.tensor(sel, device=device)
                cache.batch_select_indices(sel_t)
                mask, last_pos = mask[sel_t], last_pos[sel_t]
                alive, seqs, states, width = next_alive, next_seqs, next_states, k
                beam_scores = torch.stack(next_scores)
                logits, mask, last_pos = engine.step(
                    torch.tensor(next_tok, device=device), cache, mask, last_pos
                )
            for p, i in enumerate(rows):
                results[i] = [tokens for _, tokens in hyps[p]]
            bar.update(len(rows))
    bar.close()
    return results


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
    num_beams: int = 1,
    constraint: SchemaConstraint | None = None,
    contexts: Sequence[tuple[str, str | None]] | None = None,
) -> list[list[list[int]]]:
    """``model.generate`` with left padding; per prompt, its candidates best first."""
    import torch
    from transformers import LogitsProcessorList

    k = num_beams
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    out: list[list[list[int]]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    per_batch = batch_size if k == 1 else max(1, batch_size // k)
    with inference_mode(model):
        for b in range(0, len(order), per_batch):
            idx = order[b : b + per_batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            processors = LogitsProcessorList()
            if constraint is not None:
                processors.append(
                    _ConstraintProcessor(
                        constraint,
                        [constraint.initial_state(*contexts[i]) for i in idx],  # type: ignore[index]
                        width,
                        k,
                        1 if k == 1 else max(2, 1 + len(stops)) * k,
                    )
                )
            beam_args: dict[str, Any] = (
                {"num_return_sequences": k, "early_stopping": True, "length_penalty": 1.0}
                if k > 1
                else {}
            )
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=k,
                use_cache=True,
                eos_token_id=list(stops),
                pad_token_id=pad_id,
                synced_gpus=synced_gpus,
                repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                **beam_args,
            )
            new = gen[:, width:].tolist()
            for row, i in enumerate(idx):
                out[i] = [_cut(new[row * k + j], stops) for j in range(k)]
            bar.update(len(idx))
    bar.close()
    return out


class _ConstraintProcessor:
    """`SchemaConstraint` as a ``transformers`` logits processor (rows = prompt x beam)."""

    def __init__(
        self, constraint: SchemaConstraint, roots: list[Any], width: int, beams: int, need: int
    ) -> None:
        self.constraint = constraint
        self.roots = roots
        self.width = width
        self.beams = beams
        self.need = need
        self._states: dict[tuple[int, tuple[int, ...]], Any] = {}

    def _state(self, prompt: int, generated: tuple[int, ...]) -> Any:
        key = (prompt, generated)
        if key not in self._states:
            if not generated:
                self._states[key] = self.roots[prompt]
            else:
                parent = self._state(prompt, generated[:-1])
                self._states[key] = (
                    None if parent is None else self.constraint.advance(parent, generated[-1])
                )
        return self._states[key]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        states = [
            self._state(r // self.beams, tuple(input_ids[r, self.width :].tolist()))
            for r in range(input_ids.shape[0])
        ]
        live = [r for r, st in enumerate(states) if st is not None]
        if live:  # a finished row (padded after its stop token) keeps its scores
            scores = scores.clone()
            scores[live] = self.constraint.mask(scores[live], [states[r] for r in live], self.need)
        return scores
