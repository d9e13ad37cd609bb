"""The experiment's data, built the one way the trainer builds it.

`build_datasets` maps the parsed ``hyperparameters.data`` (and the model's chat format) onto
`dataset_utils.pipeline.prepare_data`. The training job (`trainer.job.train`), the checkpoint
evaluation (`evaluation.checkpoint_eval`, which rebuilds the test split) and ``text2sql data
inspect`` all call it, so what they show is what is trained on (SQL style included).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dataset_utils.pipeline import PreparedData, prepare_data
from trainer.config import Hyperparameters


def build_datasets(hp: Hyperparameters, tokenizer: Any) -> PreparedData:
    """Load, subset, split, restyle and tokenize the experiment's data (cached)."""
    data = hp.data
    return prepare_data(
        sources=[s.to_spec() for s in data.sources],
        tokenizer=tokenizer,
        chat_format=hp.model.chat_format,
        subset=data.subset,
        number_of_samples=data.number_of_samples,
        complexity=data.complexity,
        split=asdict(data.split),
        max_length=data.max_length,
        sql_style=data.sql_style,
        test_sample=data.test_sample,
        test_sample_seed=data.test_sample_seed,
    )
