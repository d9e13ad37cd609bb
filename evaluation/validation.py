"""Execution accuracy during training: the Trainer's generation metrics at every evaluation.

`build_generation_metrics` returns the function `trainer.hf_trainer.Text2SqlTrainer` calls
(``generation_metrics``) at each evaluation: generate SQL for a fixed validation subset with
``eval.validation_decoding``, sharded across ranks, and judge it by execution in the sandbox.
The training story (`trainer.job.train`) builds it and hands it to `trainer.training.build_trainer`,
so the training layer never imports evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from dataset_utils.formatting import FormatPlan
from dataset_utils.records import Example
from evaluation.generation import generate_sql
from evaluation.judge import GoldCache, score
from trainer.config import Hyperparameters


def validation_shard(subset: Sequence[Example], rank: int, world: int) -> tuple[list[Example], int]:
    """This rank's share of the validation subset, padded to the same length on every rank.

    Under ZeRO-3 every rank must run the same number of ``generate`` calls (``synced_gpus``:
    each forward all-gathers the layers' shards). With ``subset[rank::world]`` alone, 65
    samples in batches of 32 on 2 ranks give one rank 2 batches and the other 1: the first is
    still generating while the second waits in ``all_gather_object`` -- a deadlock. Filler rows
    (copies of the shard's first sample, or of the subset's) even the counts out; their
    outputs are dropped. Returns (rows to generate, how many of them are real).
    """
    shard = list(subset[rank::world])
    n_real = len(shard)
    longest = -(-len(subset) // world)
    filler = shard[0] if shard else subset[0]
    return shard + [filler] * (longest - n_real), n_real


def build_generation_metrics(
    hp: Hyperparameters,
    tokenizer: Any,
    plan: FormatPlan,
    examples: Sequence[Example],
    progress: bool,
) -> Callable[[Any], dict[str, float]] | None:
    """Execution accuracy (and friends) on a fixed validation subset, decoded with
    ``eval.validation_decoding`` (greedy unless set: it runs at every evaluation)."""
    subset = list(examples[: hp.eval.generation_samples])
    if not subset:
        return None
    gold_cache = GoldCache()

    def metrics(model: Any) -> dict[str, float]:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        shard, n_real = validation_shard(subset, rank, world)
        zero3 = _is_zero3(model)
        gen = generate_sql(
            _unwrap(model),
            tokenizer,
            shard,
            plan,
            batch_size=hp.eval.batch_size,
            max_new_tokens=hp.eval.max_new_tokens,
            progress=progress and rank == 0,
            desc="validation generation",
            synced_gpus=zero3,
            timeout_s=hp.eval.timeout_s,
            **asdict(hp.eval.validation_decoding),
        )
        mine = gen.sql[:n_real]  # the filler rows' outputs are dropped
        preds: list[str | None] = [None] * len(subset)
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            for r, part in enumerate(gathered):
                for j, sql in enumerate(part):
                    preds[r + j * world] = sql
        else:
            preds = list(mine)
        judged = sum(p is not None for p in preds)
        result = score(
            subset, [p or "" for p in preds], timeout_s=hp.eval.timeout_s, gold_cache=gold_cache
        )
        o = result.overall
        return {
            "execution_accuracy": o.exec_accuracy,
            "exact_match": o.exact_match,
            "executable_rate": o.executable_rate,
            "valid_sql_rate": o.valid_sql_rate,
            "bleu": o.bleu,
            "judged_samples": float(judged),
        }

    return metrics


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _is_zero3(model: Any) -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except ImportError:
        return False
