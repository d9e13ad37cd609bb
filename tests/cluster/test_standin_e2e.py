"""End to end on the stand-in master: ``det e create`` -> trial -> COMPLETED -> ``text2sql mirror``.

Everything but the master (and the agent's Docker) is the real thing: the ``det`` CLI uploads
the repo root as the context (minus ``.detignore``), the task container runs the harness's
``prep_container``, our ``startup-hook.sh`` and ``determined.exec.launch``; the YAML's
entrypoint runs ``trainer.finetune`` directly or under the real
``determined.launch.torch_distributed`` / ``determined.launch.deepspeed`` launcher on CPU ranks;
``det.core.init``, `DetCallback` and the SDK talk to the stand-in over HTTP. Models are tiny
(`tests.tiny`), data a few hundred rows of ``../shared/data`` bind-mounted into the container.

Tiers: the 1-slot trial + mirror runs in the default tier; the multi-rank, DeepSpeed, grid
search and pause/activate runs are ``slow``.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/cluster -m 'slow or not slow' -q``
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, dump, step_losses, stored_files

TORCH_DISTRIBUTED = "python -m determined.launch.torch_distributed python -m trainer.finetune"
DEEPSPEED = "python -m determined.launch.deepspeed python -m trainer.finetune"
# Reproducible numerics for loss comparisons (see tests/test_launchers.py).
DETERMINISTIC = {"efficiency": {"bf16": "false", "prefix_sharing": False, "group_by_length": False}}


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (CLI calls, containers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def assert_trial_reported(cluster: Cluster, trial_id: int, steps: int) -> list[dict[str, Any]]:
    """Training loss at every step 1..steps, ``eval_execution_accuracy`` in every validation
    report, and every checkpoint registered COMPLETED with each of its files in storage at
    the size the master recorded. Returns the trial's checkpoints as the master lists them."""
    master = cluster.master
    losses = step_losses(master, trial_id)
    assert sorted(losses) == list(range(1, steps + 1)), sorted(losses)
    validations = master.trial_metrics(trial_id, "validation")
    assert validations, "no validation metrics reached the master"
    for report in validations:
        assert "eval_execution_accuracy" in report.avg_metrics, report.avg_metrics
        assert 0.0 <= report.avg_metrics["eval_execution_accuracy"] <= 1.0
    trial = master.trials[trial_id]
    checkpoints = [
        c
        for c in master.experiment_checkpoints(trial.experiment_id)
        if c["training"]["trialId"] == trial_id
    ]
    assert checkpoints, "no checkpoint was registered"
    for c in checkpoints:
        assert c["state"] == "STATE_COMPLETED"
        files = {k: int(v) for k, v in c["resources"].items() if not k.endswith("/")}
        on_disk = stored_files(master.storage_dir, c["uuid"])
        missing = {k: v for k, v in files.items() if on_disk.get(k) != v}
        assert files and not missing, f"checkpoint {c['uuid']}: {missing}"
        step = c["metadata"]["steps_completed"]
        # The harness's layout: DetCallback uploads the Trainer's checkpoint-<step>/ folder.
        assert f"checkpoint-{step}/trainer_state.json" in files, dump(sorted(files))
        assert f"checkpoint-{step}/text2sql.json" in files
    # The final state is in a checkpoint.
    assert max(c["metadata"]["steps_completed"] for c in checkpoints) == steps
    return checkpoints


# ------------------------------------------------------------------------------------------
# Default tier: one slot, then the mirror.


def test_single_slot_trial_completes_and_mirror_registers_the_best_checkpoint(
    standin: Cluster, cluster_yaml: Callable[..., Path], tmp_path: Path, cluster_data: Path
) -> None:
    steps = 4
    # Two checkpoints, each with its validation; ranked by eval_loss, whose values differ
    # (a tiny model's execution accuracy is 0 everywhere, which would rank nothing).
    config = cluster_yaml(
        "single-slot",
        steps=steps,
        eval_steps=2,
        save_steps=2,
        lr=3e-2,
        extra={"searcher": {"name": "single", "metric": "eval_loss", "smaller_is_better": True}},
    )
    t0, cpu0 = time.monotonic(), _children_cpu()
    exp_id = standin.create(config)
    standin.completed(exp_id)
    trained_s, trained_cpu = time.monotonic() - t0, _children_cpu() - cpu0
    master = standin.master
    (trial_id,) = master.experiments[exp_id].trial_ids
    checkpoints = assert_trial_reported(standin, trial_id, steps)
    assert sorted(c["metadata"]["steps_completed"] for c in checkpoints) == [2, 4]
    assert master.trials[trial_id].restarts == 0
    assert master.progress_reports and master.progress_reports[-1] == (trial_id, 1.0)
    # What the master answers the CLI, in its own words.
    described = standin.det("e", "describe", str(exp_id)).stdout
    assert "COMPLETED" in described

    # The best checkpoint by the searcher metric, from the master's own records.
    best = min(
        checkpoints, key=lambda c: c["training"]["validationMetrics"]["avgMetrics"]["eval_loss"]
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "mirror",
        "--experiment-id",
        str(exp_id),
        "--master",
        master.url,
        "--tracking-uri",
        uri,
        "--no-progress",
    ]
    t1, cpu1 = time.monotonic(), _children_cpu()
    first = standin.text2sql(*args, TEXT2SQL_DATA=str(cluster_data))
    mirrored_s, mirrored_cpu = time.monotonic() - t1, _children_cpu() - cpu1
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    standin.check()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`text2sql.checkpoint_uuid` != ''",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["text2sql.checkpoint_uuid"] == best["uuid"]
    assert run.data.tags["text2sql.stage.registered"] == "1"
    assert run.data.params.get("method") == "lora"
    # Metric history came from the master (GetMetrics), by step ("loss" is logged as
    # MLflow's train_loss).
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    versions = client.search_model_versions("name='single-slot'")
    assert [str(v.version) for v in versions] == ["1"]

    # Run twice: the second is a no-op (no new run, no new version). The experiment also
    # holds the base / fine-tuned evaluation runs.
    n_runs = len(client.search_runs([run.info.experiment_id]))
    second = standin.text2sql(*args, TEXT2SQL_DATA=str(cluster_data))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "nothing to do" in second.stdout
    assert len(client.search_runs([run.info.experiment_id])) == n_runs
    assert len(client.search_model_versions("name='single-slot'")) == 1
    print(
        f"det e create -> COMPLETED: {trained_s:.1f} s ({trained_cpu:.1f} s CPU); "
        f"first mirror: {mirrored_s:.1f} s ({mirrored_cpu:.1f} s CPU)"
    )


# ------------------------------------------------------------------------------------------
# Slow tier: multi-rank launchers, a search, pause and resume.


@pytest.mark.slow
def test_torch_distributed_two_ranks(standin: Cluster, cluster_yaml: Callable[..., Path]) -> None:
    steps = 4
    config = cluster_yaml(
        "ddp", steps=steps, slots=2, entrypoint=TORCH_DISTRIBUTED, hparams=DETERMINISTIC
    )
    exp_id = standin.create(config)
    standin.completed(exp_id)
    (trial_id,) = standin.master.experiments[exp_id].trial_ids
    assert_trial_reported(standin, trial_id, steps)
    logs = standin.master.trial_log_text(trial_id)
    # Both ranks ran (wrap_rank prefixes each rank's output), under torch.distributed.run.
    assert "[rank=0]" in logs and "[rank=1]" in logs
    assert "torch.distributed.run" in logs or "torch_distributed" in logs
    # Only the chief reports: one training report per step.
    reports = standin.master.trial_metrics(trial_id, "training")
    assert len([r for r in reports if "loss" in r.avg_metrics]) == steps


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks(standin: Cluster, cluster_yaml: Callable[..., Path]) -> None:
    steps = 4
    config = cluster_yaml(
        "zero2",
        method="full",
        steps=steps,
        slots=2,
        lr=1e-3,
        entrypoint=DEEPSPEED,
        # The deepspeed launcher starts one rank per device; DeepSpeed's CPU accelerator
        # counts devices from LOCAL_SIZE (else NUMA nodes: 1 here). On GPUs the agent's
        # CUDA_VISIBLE_DEVICES plays this part.
        env=["LOCAL_SIZE=2"],
        # Relative to the context directory, the trial's working directory.
        hparams={
            **DETERMINISTIC,
            "training_args": {"deepspeed": "experiments/ds_configs/zero2.json"},
        },
    )
    exp_id = standin.create(config)
    standin.completed(exp_id, timeout=2700)  # the first run compiles DeepSpeed's CPU op
    (trial_id,) = standin.master.experiments[exp_id].trial_ids
    checkpoints = assert_trial_reported(standin, trial_id, steps)
    logs = standin.master.trial_log_text(trial_id)
    assert "[rank=0]" in logs and "[rank=1]" in logs
    final = max(checkpoints, key=lambda c: c["metadata"]["steps_completed"])
    files = set(final["resources"])
    # ZeRO-2: each rank's optimizer partition, plus the (full) model weights.
    for rank in (0, 1):
        assert any(
            re.search(rf"global_step{steps}/.*zero_pp_rank_{rank}_.*optim_states\.pt$", f)
            for f in files
        ), sorted(files)
    assert f"checkpoint-{steps}/model.safetensors" in files


@pytest.mark.slow
def test_grid_search_two_trials(standin: Cluster, cluster_yaml: Callable[..., Path]) -> None:
    steps = 3
    config = cluster_yaml(
        "grid",
        steps=steps,
        hparams={"training_args": {"learning_rate": {"type": "categorical", "vals": [1e-3, 3e-2]}}},
        extra={
            "searcher": {
                "name": "grid",
                "metric": "eval_execution_accuracy",
                "smaller_is_better": False,
            }
        },
    )
    exp_id = standin.create(config)
    standin.completed(exp_id)
    master = standin.master
    trial_ids = master.experiments[exp_id].trial_ids
    assert len(trial_ids) == 2
    rates = sorted(master.trials[t].hparams["training_args"]["learning_rate"] for t in trial_ids)
    assert rates == [1e-3, 3e-2]
    losses = []
    for t in trial_ids:
        assert master.trials[t].state == "COMPLETED"
        assert_trial_reported(standin, t, steps)
        losses.append(step_losses(master, t))
    # Different hyperparameters, different training: the step-1 loss is the same model on the
    # same batch, the later ones differ.
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-5)
    assert losses[0][steps] != pytest.approx(losses[1][steps], rel=1e-3)


@pytest.mark.slow
def test_pause_checkpoints_and_activate_resumes_with_the_same_losses(
    standin: Cluster, cluster_yaml: Callable[..., Path]
) -> None:
    steps = 8
    common: dict[str, Any] = {"steps": steps, "lr": 3e-2, "hparams": DETERMINISTIC}
    master = standin.master

    reference = standin.create(cluster_yaml("uninterrupted", **common))
    standin.completed(reference)
    (ref_trial,) = master.experiments[reference].trial_ids
    expected = step_losses(master, ref_trial)

    exp_id = standin.create(cluster_yaml("paused", **common))
    (trial_id,) = master.experiments[exp_id].trial_ids
    master.wait_for(lambda: len(step_losses(master, trial_id)) >= 2, 1800, "two training steps")
    out = standin.det("e", "pause", str(exp_id)).stdout
    assert f"Paused experiment {exp_id}" in out
    master.wait_for(lambda: master.trials[trial_id].state == "PAUSED", 1800, "the trial to stop")
    trial = master.trials[trial_id]
    first = master.allocations[trial.allocations[0]]
    assert first.exit_code == 0 and first.acked_preemption
    (paused_ckpt,) = master.experiment_checkpoints(exp_id)
    paused_at = paused_ckpt["metadata"]["steps_completed"]
    assert 2 <= paused_at < steps, paused_at
    assert max(step_losses(master, trial_id)) == paused_at
    assert master.experiments[exp_id].state == "PAUSED"

    out = standin.det("e", "activate", str(exp_id)).stdout
    assert f"Activated experiment {exp_id}" in out
    standin.completed(exp_id)
    assert len(trial.allocations) == 2 and trial.run_id == 2 and trial.restarts == 0
    second = master.allocations[trial.allocations[1]]
    assert second.latest_checkpoint == paused_ckpt["uuid"] and second.exit_code == 0
    # Resumed at the checkpoint: the second run reported steps paused_at+1..steps only, and
    # ended at exactly max_steps.
    second_run = [
        r.steps_completed
        for r in master.trial_metrics(trial_id, "training")
        if r.trial_run_id == 2 and "loss" in r.avg_metrics
    ]
    assert second_run == list(range(paused_at + 1, steps + 1))
    got = step_losses(master, trial_id)
    assert sorted(got) == list(range(1, steps + 1))
    diff = max(abs(got[s] - expected[s]) for s in expected)
    print(f"paused at step {paused_at}; max |loss - uninterrupted loss| = {diff:.2e}")
    assert diff < 1e-4, (got, expected)
