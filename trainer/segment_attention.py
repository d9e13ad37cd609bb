"""Attention for shared-prefix and packed batches, without a quadratic mask.

A batch that shares prompt prefixes (`trainer.hf_trainer.CompletionCollator` with
``prefix_sharing``) or packs rows (``packing``) is ONE flattened row of T tokens, no padding: every
token is computed once, whatever the batch holds. `Segments` says how that row splits into
independent causal spans: a span either stands alone (a row that shares nothing, or a shared
prefix) or continues a prefix span (one question's block: it attends to the prefix and, causally,
to itself -- exactly what it would attend to if its row ran alone). ``position_ids`` restart per
row, so RoPE sees each row's own positions.

`segment_attention_forward` is registered with transformers' `AttentionInterface` as
``text2sql_segments`` (`enable_segment_attention` switches a model to it). Given ``segments`` (a
keyword argument of the model's forward, passed through to every attention layer):

- on CUDA, FlexAttention with a `BlockMask` built once per batch from the spans (block-sparse:
  only the prefix/own-block tiles are computed);
- elsewhere (CPU: torch 2.13's FlexAttention has no backward there), one SDPA call per span:
  causal over a standalone span; over [prefix keys, own keys] with a lower-right causal mask for
  a block. GQA heads are not expanded (``enable_gqa``), nothing is padded, and the cost is
  linear in the number of blocks (the prefix's keys are read by each block, never recomputed).

Without ``segments`` (generation, or any ordinary padded batch) it IS transformers' SDPA
attention, with SDPA's own mask creation, so a model switched to it behaves as before.
The per-example losses and gradients equal plain padding's (tests/test_prefix_sharing.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SEGMENT_ATTENTION = "text2sql_segments"
_BASE = "sdpa"  # what runs without segments: generation, padded batches


@dataclass(eq=False)
class Segments:
    """The spans of one flattened row of ``length`` tokens, in order, covering it exactly.

    Each span is ``(ctx_start, ctx_end, start, end)``: tokens ``start:end`` attend causally to
    themselves and to all of ``ctx_start:ctx_end`` (the prefix span they continue; empty for a
    standalone span). A context is always an earlier standalone span.
    """

    spans: tuple[tuple[int, int, int, int], ...]
    length: int
    _block_masks: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        at = 0
        standalone: set[tuple[int, int]] = set()
        for cs, ce, s, e in self.spans:
            if s != at or e <= s:
                raise ValueError(f"spans must tile 0..{self.length} in order; found {self.spans}")
            if cs != ce and (cs, ce) not in standalone:
                raise ValueError(f"context {cs}:{ce} of span {s}:{e} is not an earlier span")
            if cs == ce:
                standalone.add((s, e))
            at = e
        if at != self.length:
            raise ValueError(f"spans cover {at} of {self.length} tokens")

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: (document, block). Tokens attend within their document, to block -1
        (a prefix or a standalone row) and to their own block."""
        doc = torch.empty(self.length, dtype=torch.int32)
        blk = torch.empty(self.length, dtype=torch.int32)
        doc_of: dict[tuple[int, int], int] = {}
        for i, (cs, ce, s, e) in enumerate(self.spans):
            if cs == ce:
                doc_of[(s, e)] = len(doc_of)
                doc[s:e], blk[s:e] = doc_of[(s, e)], -1
            else:
                doc[s:e], blk[s:e] = doc_of[(cs, ce)], i
        return doc, blk

    def dense_mask(self) -> torch.Tensor:
        """The (length, length) boolean mask these spans stand for (for tests and checks)."""
        doc, blk = self.token_ids()
        q = torch.arange(self.length)
        return _allowed(q[:, None], q[None, :], doc, blk)

    def block_mask(self, device: torch.device) -> Any:
        """FlexAttention `BlockMask` of these spans on ``device`` (built once, then cached)."""
        key = str(device)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            doc, blk = self.token_ids()
            # Padded to whole 128-token tiles: a kernel may evaluate the mask for indices past
            # the last token of a partial tile (they are masked out; the reads stay in bounds).
            pad = -self.length % 128
            doc = F.pad(doc, (0, pad), value=-1).to(device)
            blk = F.pad(blk, (0, pad), value=-1).to(device)

            def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
                return _allowed(q, kv, doc, blk)

            # Compiled on CUDA (as transformers builds its own block masks): the mask is
            # evaluated tile by tile instead of as a dense T x T tensor.
            self._block_masks[key] = create_block_mask(
                mask_mod,
                None,
                None,
                self.length,
                self.length,
                device=device,
                _compile=torch.device(device).type == "cuda",
            )
        return self._block_masks[key]


def _allowed(q: Any, kv: Any, doc: torch.Tensor, blk: torch.Tensor) -> Any:
    return (q >= kv) & (doc[q] == doc[kv]) & ((blk[kv] < 0) | (blk[kv] == blk[q]))


def _span_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """One SDPA call per span; (1, heads, T, dim) in, (1, T, heads, dim) out."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for cs, ce, s, e in segments.spans:
        q = query[:, :, s:e]
        if cs == ce:
            k, v, mask, causal = key[:, :, s:e], value[:, :, s:e], None, True
        else:
            k = torch.cat([key[:, :, cs:ce], key[:, :, s:e]], dim=2)
            v = torch.cat([value[:, :, cs:ce], value[:, :, s:e]], dim=2)
            n = e - s
            # The whole prefix, then causal over its own tokens (lower-right aligned).
            mask = torch.ones((n, ce - cs + n), dtype=torch.bool, device=query.device)
            mask[:, ce - cs :] = torch.ones((n, n), dtype=torch.bool, device=query.device).tril()
            causal = False
        outs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=causal,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: spans when ``segments`` is given, else plain SDPA."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if segments is None:
        return ALL_ATTENTION_FUNCTIONS[_BASE](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1 or query.shape[2] != segments.length:
        raise ValueError(
            f"segments describe one row of {segments.length} tokens; got queries of shape "
            f"{tuple(query.shape)}"
        )
    if query.device.type == "cuda" and dropout == 0.0:
        from transformers.integrations.flex_attention import flex_attention_forward

        out, _ = flex_attention_forward(
            module,
            query,
            key,
            value,
            segments.block_mask(query.device),
            scaling=scaling,
            **kwargs,
        )
        return out, None
    return _span_attention(query, key, value, segments, dropout, scaling), None


@functools.cache
def register_segment_attention() -> str:
    """Register ``text2sql_segments`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
    # Masks as SDPA's: generation and padded batches are unchanged. A segment batch passes an
    # all-ones 2-D mask, for which SDPA's mask builder returns None (no T x T mask is built).
    AttentionMaskInterface.register(SEGMENT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[_BASE])
    return SEGMENT_ATTENTION


def enable_segment_attention(model: Any) -> None:
    """Switch ``model`` (a transformers model, PEFT-wrapped or not) to segment attention."""
    register_segment_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != SEGMENT_ATTENTION:
        base.set_attn_implementation(SEGMENT_ATTENTION)


def uses_segment_attention(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION
