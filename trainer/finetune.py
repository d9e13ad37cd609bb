"""Fine-tune a causal LM on text-to-SQL: the one entrypoint for every experiment.

Run it
  - on a Determined cluster, as the experiment's entrypoint (hyperparameters come from
    ``det.get_cluster_info().trial.hparams``)::

        python -m determined.launch.torch_distributed python -m trainer.finetune

  - off-cluster, through the local runner (``text2sql run experiments/<x>.yaml``), which writes
    the resolved experiment into a trial folder and runs this module with ``--trial-dir``
    (under torchrun / deepspeed for several slots; `trainer.job.run_off_cluster` in-process for
    one).

What one run does, and where each step lives:

1. config: the experiment's ``hyperparameters`` parsed once into `trainer.config.Hyperparameters`
   (on a cluster from the trial, off-cluster from the trial folder's ``experiment.yaml``);
2. where it runs: `trainer.job.run_on_cluster` (Core API context + `FixedDetCallback`) or
   `trainer.job.run_off_cluster` (Core API local context, run store, SIGTERM preemption, live
   MLflow) -- the only two differences, both filling one `trainer.training.RunEnv`;
3. the story, `trainer.job.train`: seed -> tokenizer (`trainer.modeling.load_tokenizer`) -> data
   (`trainer.training_data.build_datasets`) -> `TrainingArguments`
   (`trainer.training.build_training_args`) -> model, full / LoRA / QLoRA
   (`trainer.modeling.build_model`) -> `Trainer` (`trainer.training.build_trainer`, execution
   accuracy from `evaluation.validation`) -> train, resuming from the latest checkpoint -> the
   final checkpoint, with ``text2sql.json`` (`trainer.checkpoint`) in every one.

Nothing imports this module (a test in ``tests/test_layers.py`` keeps it so): it is a script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dataset_utils.errors import UserError
from trainer.job import run_off_cluster, run_on_cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.finetune",
        description="Fine-tune on text-to-SQL. On a Determined cluster the hyperparameters come "
        "from the trial; off-cluster pass --trial-dir (the local runner does this for you: "
        "`text2sql run experiments/<x>.yaml`).",
    )
    parser.add_argument("--trial-dir", type=Path, help="off-cluster trial folder (local runner)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    try:
        info = None
        try:
            import determined as det

            info = det.get_cluster_info()
        except ImportError:
            pass
        if info is not None and info.task_type == "TRIAL":
            run_on_cluster(info)
        elif ns.trial_dir is not None:
            run_off_cluster(ns.trial_dir, progress=not ns.no_progress)
        else:
            raise UserError(
                "not on a Determined cluster and no --trial-dir given; run experiments off-cluster "
                "with `text2sql run experiments/<x>.yaml`"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
