"""Determined Core API wiring shared by the cluster and the off-cluster paths.

`trainer.job.run_on_cluster` and `run_off_cluster` both build their Core API context here:

- `launcher_from_env` / `distributed_context`: the `DistributedContext` of the launcher that
  actually started this process, read from the variables that launcher sets. Never from the
  experiment config: a YAML may name a DeepSpeed config (``training_args.deepspeed``) and still
  run under ``determined.launch.torch_distributed`` (HF's Trainer drives DeepSpeed under
  torchrun), and `DistributedContext.from_deepspeed()` then dies on ``KeyError: 'LOCAL_SIZE'``.
- `core_init`: ``det.core.init`` with ``TensorboardMode.MANUAL``. The default, ``AUTO``, builds
  a TensorBoard metric writer at init (``determined/core/_context.py`` ->
  ``tensorboard.get_metric_writer()`` -> ``torch.utils.tensorboard``), which needs the
  ``tensorboard`` package: neither this project nor the task images install it, so every trial
  died before its first step. Metrics reach the master (WebUI, ``det trial logs``, the SDK) and
  MLflow either way; MANUAL only means no TensorBoard event files are uploaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dataset_utils.errors import UserError

# What each launcher sets in every rank's environment (torch.distributed.run; DeepSpeed's
# launcher/launch.py). RANK, LOCAL_RANK and WORLD_SIZE are common to both.
TORCHRUN_VARS = ("LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
DEEPSPEED_VARS = ("LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


def launcher_from_env(environ: Mapping[str, str] | None = None) -> str:
    """Which launcher started this process: ``none``, ``torch_distributed`` or ``deepspeed``."""
    env = os.environ if environ is None else environ
    if "RANK" not in env:
        return "none"
    if all(k in env for k in DEEPSPEED_VARS):
        return "deepspeed"
    if all(k in env for k in TORCHRUN_VARS):
        return "torch_distributed"
    raise UserError(
        f"RANK={env['RANK']} is set but neither torchrun's ({', '.join(TORCHRUN_VARS)}) nor "
        f"DeepSpeed's ({', '.join(DEEPSPEED_VARS)}) rank variables are: start multi-process "
        "training with determined.launch.torch_distributed / torchrun or "
        "determined.launch.deepspeed / deepspeed"
    )


def distributed_context() -> Any:
    """The launcher's `det.core.DistributedContext`, or None for one process without one."""
    import determined as det

    launcher = launcher_from_env()
    if launcher == "deepspeed":
        return det.core.DistributedContext.from_deepspeed()
    if launcher == "torch_distributed":
        return det.core.DistributedContext.from_torch_distributed()
    return None


def core_init(distributed: Any, *, checkpoint_storage: str | None = None) -> Any:
    """``det.core.init`` as this project uses it (see the module docstring for MANUAL)."""
    import determined as det

    return det.core.init(
        distributed=distributed,
        checkpoint_storage=checkpoint_storage,
        tensorboard_mode=det.core.TensorboardMode.MANUAL,
    )
