"""Run a Determined experiment YAML off-cluster: ``text2sql run experiments/<x>.yaml``.

The same entrypoint as on the cluster (``python -m trainer.finetune``) runs with
``slots_per_trial`` processes (capped to the CPUs/GPUs present), honouring the YAML's launcher:

- no launcher: one process (in this process, `trainer.job.run_off_cluster`, so Ctrl-C /
  SIGTERM checkpoint and stop cleanly), handed the experiment as ``text2sql`` parsed it;
- ``determined.launch.torch_distributed``: ``torchrun --nproc_per_node N`` (gloo on CPU);
- ``determined.launch.deepspeed``: the ``deepspeed`` launcher (``DS_ACCELERATOR=cpu`` on CPU).

Runs live in ``<runs-dir>/<experiment-name>/trial-<n>`` (see `trainer.run_store`). Re-running
an experiment whose last trial did not finish resumes that trial from its latest checkpoint.

``text2sql run`` is three stages: `launch` (train), `evaluate_trial` (the best checkpoint on
the test split; report in ``<trial>/evaluation-<uuid8>/``), then the MLflow mirror
(`cluster.mirror.mirror_local_trial`, handed the evaluation so it does not evaluate again;
skipped by ``--no-mirror``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.local_source import LocalCheckpointSource
from dataset_utils.errors import UserError
from evaluation.checkpoint_eval import CheckpointEvaluation, evaluate_checkpoint, report_dir_for
from trainer.config import Hyperparameters
from trainer.experiment import Experiment, local_world_size, threads_per_rank
from trainer.job import run_off_cluster
from trainer.run_store import ExperimentDir, TrialDir

log = logging.getLogger(__name__)


@dataclass
class LaunchResult:
    trial: TrialDir
    world_size: int
    launcher: str
    returncode: int
    summary: dict[str, Any] | None


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "experiment"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deepspeed_config_path(exp: Experiment) -> str | None:
    """``training_args.deepspeed`` as an absolute path (relative ones are context-relative)."""
    ds = (exp.resolved_hparams.get("training_args") or {}).get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_absolute():
        return str((exp.context_dir / ds).resolve())
    return ds if isinstance(ds, str) else None


def trial_config(exp: Experiment) -> dict[str, Any]:
    """The experiment as its trial folder keeps it: the config after overrides, with the
    search space resolved and the DeepSpeed config path absolute."""
    config = dict(exp.config)
    hparams = dict(exp.resolved_hparams)
    ta = dict(hparams.get("training_args") or {})
    if isinstance(ta.get("deepspeed"), str):
        ta["deepspeed"] = deepspeed_config_path(exp)
    hparams["training_args"] = ta
    config["hyperparameters"] = hparams
    return config


def trial_hparams(exp: Experiment, config: dict[str, Any] | None = None) -> Hyperparameters:
    """`exp.hparams` as `trial_config` (or ``config``, its result) writes them -- the only
    difference is the resolved DeepSpeed path in ``training_args`` -- without parsing again."""
    config = trial_config(exp) if config is None else config
    ta = dict(config["hyperparameters"]["training_args"])
    return dataclasses.replace(exp.hparams, training_args=ta)


def prepare_trial(exp: Experiment, runs_dir: Path, *, new: bool = False) -> tuple[TrialDir, bool]:
    """Write the resolved experiment into its folder and pick (resume) or create a trial."""
    exp_dir = ExperimentDir(runs_dir / slug(exp.name))
    exp_dir.path.mkdir(parents=True, exist_ok=True)
    config = trial_config(exp)
    resumable = None if new else exp_dir.resumable_trial()
    if resumable is not None:
        previous = yaml.safe_load((exp_dir.path / "experiment.yaml").read_text())
        if previous != config:
            raise UserError(
                f"{resumable.path} was started with a different configuration; re-run with "
                "--new to start a new trial (nothing is overwritten)"
            )
        # The Trainer's scratch folder may hold a half-written checkpoint-<n> from the killed
        # run; training resumes from the run store, and a stale checkpoint-<n> would make the
        # final save look done. Only the run store's checkpoints are kept.
        shutil.rmtree(resumable.hf_output_dir, ignore_errors=True)
        return resumable, True
    tmp = exp_dir.path / ".experiment.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, exp_dir.path / "experiment.yaml")
    return exp_dir.new_trial(), False


def _command(exp: Experiment, trial: TrialDir, world: int, progress: bool) -> list[str]:
    tail = ["--trial-dir", str(trial.path)] + ([] if progress else ["--no-progress"])
    if exp.launcher == "deepspeed":
        exe = shutil.which("deepspeed")
        if exe is None:
            raise UserError(
                "this experiment uses the DeepSpeed launcher but deepspeed is not installed: "
                "pip install 'text2sql-finetune[deepspeed]'"
            )
        return [
            exe,
            "--num_gpus",
            str(world),
            "--master_port",
            str(_free_port()),
            "--module",
            "trainer.finetune",
            *tail,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "trainer.finetune",
        *tail,
    ]


def launch(
    exp: Experiment,
    runs_dir: Path,
    *,
    new: bool = False,
    progress: bool = True,
    slots: int | None = None,
) -> LaunchResult:
    """Run (or resume) one trial of ``exp`` off-cluster."""
    import torch

    trial, resumed = prepare_trial(exp, runs_dir, new=new)
    # The YAML the trial came from: the MLflow run's source (with the git commit).
    trial.update_info(experiment_file=str(exp.path.resolve()))
    world = slots if slots is not None else local_world_size(exp)
    print(f"trial folder: {trial.path}" + (" (resuming)" if resumed else ""), flush=True)
    for note in exp.notes:
        print(f"search space resolved for this local trial: {note}", flush=True)
    if world == 1 and exp.launcher != "deepspeed":
        # In this process: the experiment parsed once (cli -> experiment -> config) goes on
        # as it is; launched ranks below read the trial folder's copy.
        config = trial_config(exp)
        summary = run_off_cluster(
            trial.path, progress=progress, parsed=(config, trial_hparams(exp, config))
        )
        return LaunchResult(trial, 1, "none", 0, summary)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(world)))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = _command(exp, trial, world, progress)
    print(f"launching {world} processes: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        # Preemption: every rank gets SIGTERM, agrees on a step, checkpoints and exits.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    summary = None
    summary_file = trial.path / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    if rc != 0:
        raise UserError(
            f"training exited with code {rc}; see the log above. The trial folder {trial.path} "
            "keeps every complete checkpoint: re-run the same command to resume",
            exit_code=rc if 0 < rc < 128 else 1,
        )
    return LaunchResult(trial, world, exp.launcher, rc, summary)


def evaluate_trial(
    trial_dir: str | Path, *, progress: bool = True, decoding: dict[str, Any] | None = None
) -> CheckpointEvaluation:
    """The evaluation stage of ``text2sql run``: the trial's best checkpoint (by the searcher
    metric) against its base model on the test split; the report (report.md, report.json,
    exec_accuracy.png, per_example.csv, curves.png) goes to ``<trial>/evaluation-<uuid8>/``."""
    source = LocalCheckpointSource(trial_dir)
    info = source.best_checkpoint()
    name = source.config.get("name") or source.trial.experiment_dir.name
    return evaluate_checkpoint(
        source.local_path(info),
        report_dir_for(source.trial.path, info.uuid),
        title=f"{name}: checkpoint {info.uuid[:8]} vs base model",
        history=source.metric_history(info),
        curves_title=f"{name}: trial {info.trial_id}",
        decoding=decoding,
        progress=progress,
    )
