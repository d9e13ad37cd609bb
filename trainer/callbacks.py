"""Trainer callbacks: preemption, the local run store, fixed DetCallback.

On a cluster the trainer uses `FixedDetCallback` (Determined's own `DetCallback` with its
0.38.1 holes closed). Off-cluster, where `DetCallback` refuses to run, `LocalRunCallback` does
the same jobs against the Core API's local context and the run store: metrics by step,
checkpoints in Determined's layout, preemption on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.run_store import TrialDir

log = logging.getLogger(__name__)

SPEED_SUFFIXES = ("_runtime", "_per_second", "_compilation_time")


def split_metrics(logs: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """("validation" | "training", numeric metrics without HF's speed counters)."""
    group = "validation" if any(k.startswith("eval_") for k in logs) else "training"
    metrics = {
        k: float(v)
        for k, v in logs.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k != "epoch"
        and not k.endswith(SPEED_SUFFIXES)
    }
    if "epoch" in logs:
        metrics["epochs"] = float(logs["epoch"])
    return group, metrics


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class PreemptionWatcher:
    """Turns SIGTERM (and SIGINT) into a flag the training loop checks at step boundaries."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionWatcher:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # signal.signal raises ValueError outside the main thread: no handler there.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received signal %d: saving a checkpoint and stopping at the next step", signum)
        self.requested.set()

    def should_stop(self) -> bool:
        """Agreed across ranks: stop when any rank was signalled."""
        flag = self.requested.is_set()
        dist = _dist()
        if dist is None:
            return flag
        import torch

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class MetricsLogger(Protocol):
    """Where `LocalRunCallback` also sends metrics (`cluster.mlflow_tracking.MlflowLiveLogger`,
    a layer above: the callback only knows this much of it)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> bool: ...


class LocalRunCallback(TrainerCallback):
    """Off-cluster: metrics and checkpoints into the run store, preemption on SIGTERM."""

    def __init__(
        self,
        trial: TrialDir,
        *,
        core_context: Any = None,
        preemption: PreemptionWatcher | None = None,
        metadata: Callable[[], dict[str, Any]] | None = None,
        mlflow_logger: MetricsLogger | None = None,
        keep_latest: int = 1,
        keep_best: int = 1,
        searcher_metric: str | None = None,
        smaller_is_better: bool = True,
        is_chief: bool = True,
    ) -> None:
        self.trial = trial
        self.core_context = core_context
        self.preemption = preemption
        self.metadata = metadata or (lambda: {})
        self.mlflow = mlflow_logger
        self.keep_latest = keep_latest
        self.keep_best = keep_best
        self.searcher_metric = searcher_metric
        self.smaller_is_better = smaller_is_better
        self.is_chief = is_chief
        self.last_validation: dict[str, float] = {}
        self.preempted = False
        self.last_stored_step = -1

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        group, metrics = split_metrics(logs)
        if not metrics:
            return
        if group == "validation":
            self.last_validation = metrics
        self.trial.report_metrics(group, state.global_step, metrics)
        if self.core_context is not None:
            self.core_context.train.report_metrics(
                group=group, steps_completed=state.global_step, metrics=metrics
            )
        if self.mlflow is not None:
            self.mlflow.log(metrics, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.preemption is not None and self.preemption.should_stop():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        dist = _dist()
        if dist is not None:
            dist.barrier()  # every rank has written its shard files
        if state.is_world_process_zero and state.global_step > self.last_stored_step:
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            meta = {
                **self.metadata(),
                "steps_completed": state.global_step,
                "trial_id": self.trial.trial_id,
                "metrics": dict(self.last_validation),
                "preempted": self.preempted,
            }
            entry = self.trial.store_checkpoint(src, meta)
            self.last_stored_step = state.global_step
            log.info("checkpoint %s stored (step %d)", entry["uuid"], state.global_step)
            self.trial.prune(
                self.keep_latest, self.keep_best, self.searcher_metric, self.smaller_is_better
            )
        if dist is not None:
            dist.barrier()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.mlflow is not None and state.is_world_process_zero:
            self.mlflow.flush()


def fixed_det_callback_class() -> type:
    """Determined's `DetCallback` with the 0.38.1 bugs fixed (imported lazily: optional dep).

    1. ASHA (``adaptive_asha``/``async_halving``) configs crash `_check_searcher_config` with
       ``AttributeError: 'DetCallback' object has no attribute 'required_metrics'``: the list
       is never created. We create it.
    2. `load_last_checkpoint` sets ``args.resume_from_checkpoint`` but the examples never pass it
       to ``trainer.train()``, so a preempted trial restarts at step 0. We expose the path as
       ``resume_from_checkpoint`` and the entrypoint passes it on.
    3. `load_last_checkpoint` reads ``args.overwrite_output_dir``, which transformers 5 removed:
       every trial resuming from a checkpoint died with ``AttributeError``. Overridden.
    4. `on_save` uploads with ``shard=True`` and a selector on every rank. Ranks on one node
       share ``output_dir``, so each lists the same files, Determined sees every file as a
       conflict and every rank reads each whole file into memory for an MD5
       (``CheckpointContext._resolve_conflicts``): for DDP TinyLlama, the 8.8 GB
       ``optimizer.pt`` on every rank at every save. Here exactly one rank per directory (the
       lowest rank that sees it: same device and inode, Determined's own rule for sharing a
       directory) uploads the step's files; the others join the sharded upload with nothing.
       Across nodes with node-local disks each node's lowest rank uploads its own files
       (DeepSpeed's per-rank ZeRO shards, per-rank RNG states), so the stored checkpoint still
       holds every shard.
    5. Preemption is only checked in `on_log` (every ``logging_steps``). We also check it at
       every step end, so a paused trial saves and exits after its current step.
    """
    from determined.transformers import DetCallback

    class FixedDetCallback(DetCallback):  # type: ignore[misc]
        def __init__(self, core_context: Any, args: TrainingArguments, **kwargs: Any) -> None:
            self.required_metrics: list[str] = []
            self.preempted = False
            super().__init__(core_context, args, **kwargs)
            self.resume_from_checkpoint: str | None = args.resume_from_checkpoint

        def load_last_checkpoint(self, args: TrainingArguments) -> None:
            from transformers.trainer_utils import get_last_checkpoint

            latest = self.info.latest_checkpoint
            if latest is None:
                return
            # All files (DeepSpeed needs every rank's shards on every node).
            self.core_context.checkpoint.download(latest, args.output_dir)
            args.resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            log.info("latest checkpoint %s downloaded to %s", latest, args.resume_from_checkpoint)

        def _check_searcher_config(self, cfg: dict[str, Any], args: TrainingArguments) -> None:
            if not hasattr(self, "required_metrics"):
                self.required_metrics = []
            super()._check_searcher_config(cfg, args)

        def on_step_end(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            **kwargs: Any,
        ) -> None:
            super().on_step_end(args, state, control, **kwargs)
            # Every rank calls this in step, as should_preempt() requires.
            if self.core_context.preempt.should_preempt():
                if not self.preempted:
                    log.info("preempted at step %d: saving a checkpoint", state.global_step)
                self.preempted = True
                control.should_training_stop = True

        def on_save(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            **kwargs: Any,
        ) -> None:
            self.last_save = state.global_step
            step_dir = f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and self.user_data is not None:
                self._on_save_user_data(os.path.join(args.output_dir, step_dir))
            metadata: dict[str, Any] = {"steps_completed": state.global_step}
            if self.info.task_type == "TRIAL":
                metadata["trial_id"] = self.info.trial.trial_id
            checkpoint = self.core_context.checkpoint
            if checkpoint_uploader(self.core_context.distributed, args.output_dir):

                def selector(path: str) -> bool:
                    return path.startswith((f"{step_dir}/", "runs/"))

                checkpoint.upload(args.output_dir, metadata=metadata, shard=True, selector=selector)
            else:
                checkpoint.upload(None, metadata=metadata, shard=True)

    return FixedDetCallback


def checkpoint_uploader(distributed: Any, output_dir: str) -> bool:
    """True on the one rank that uploads ``output_dir``: the lowest rank that sees the same
    directory (device and inode). A collective: every rank must call it in step."""
    try:
        st = os.stat(output_dir)
        uid: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except FileNotFoundError:  # this rank wrote nothing (no folder): nothing to upload
        uid = None
    uids = distributed.allgather(uid)
    return uid is not None and uids.index(uid) == distributed.rank
