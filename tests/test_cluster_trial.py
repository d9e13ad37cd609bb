"""A cluster trial run with Determined's own code, the master stood in (tests/det_trial.py).

``trainer.job.run_on_cluster`` runs in this process as the YAML's entrypoint runs it in a
one-slot task container: the real ``det.core.init`` (Core API context: session, metrics,
preemption long-poll, checkpoint storage), the real `DetCallback` (our `FixedDetCallback`),
the real Trainer on a tiny Llama, checkpoints uploaded by Determined's own storage manager to
``directory`` checkpoint storage. Only the master is a stand-in; any route it does not know
fails the test.

What each test holds (and which issue 12 finding it covers):

- 1: ``det.core.init``'s default ``tensorboard_mode=AUTO`` imports ``tensorboard``, which
  nothing installs: every trial died before its first step. The trial now completes, with
  training and validation metrics (``eval_execution_accuracy``) and a checkpoint at the master.
- 2: the checkpoint is stored as ``<uuid>/checkpoint-<step>/...`` + ``metadata.json``; the
  evaluation reads it in exactly that layout (it refused it: "has no text2sql.json"), and
  (slow) ``text2sql mirror --experiment-id`` downloads it through the SDK, evaluates and
  registers it, and a second mirror is a no-op.
- 7: a pause (``det e pause``: the master's preemption signal) that arrives while the trial is
  loading stops it before its first training step; one that arrives mid-training stops it
  after the current step with a checkpoint, not at the next ``logging_steps``.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_cluster_trial.py -q``
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import tiny
from tests.det_trial import TrialContainer, TrialMaster, iter_files, running_master

# The SDK's side (experiment, checkpoint listing): tests/test_checkpoint_source.py's fake master.
from tests.test_checkpoint_source import EXPERIMENT_ID, FakeMaster, fake_master, master  # noqa: F401

STEPS = 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass
class ClusterRun:
    """One finished in-process cluster trial: what the master recorded and where it stored."""

    master: TrialMaster
    container: TrialContainer
    storage: Path
    output_dir: Path
    summary: dict[str, Any] | None

    @property
    def checkpoint(self) -> dict[str, Any]:
        assert len(self.master.checkpoints) == 1, self.master.checkpoints
        return self.master.checkpoints[0]


def trial_config(
    tmp: Path, model: Path, *, steps: int, overrides: list[str]
) -> tuple[dict[str, Any], dict[str, Any], Path, Path]:
    """The experiment config and hparams a master hands a trial of the tiny YAML."""
    from trainer.experiment import load_experiment

    out, storage = tmp / "hf-output", tmp / "checkpoint-storage"
    path = tiny.write_experiment(tmp / "exp.yaml", model, steps=steps)
    exp = load_experiment(
        path,
        [f"training_args.output_dir={out}", "efficiency.bf16=false", *overrides],
        schema=False,
    )
    config = dict(exp.config)
    # The cluster's checkpoint storage, merged in by the master ("directory": a path that every
    # container mounts; here, a temp folder).
    config["checkpoint_storage"] = {
        "type": "directory",
        "container_path": str(storage),
        "save_experiment_best": 0,
        "save_trial_best": 1,
        "save_trial_latest": 2,
    }
    return config, exp.resolved_hparams, out, storage


def run_cluster_trial(
    tmp: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    steps: int = STEPS,
    overrides: list[str] = (),  # type: ignore[assignment]
    stand_in: TrialMaster | None = None,
) -> ClusterRun:
    """``run_on_cluster`` in this process, as the trial's entrypoint in a 1-slot container."""
    from trainer.job import run_on_cluster

    config, hparams, out, storage = trial_config(tmp, model, steps=steps, overrides=list(overrides))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with running_master(stand_in) as m:
        container = TrialContainer(tmp / "container", config, hparams, m.url).write()
        info = container.activate(monkeypatch)
        summary = run_on_cluster(info)
    assert not m.unknown, f"the trial called master routes the stand-in lacks: {m.unknown}"
    assert not m.errors, m.errors
    return ClusterRun(m, container, storage, out, summary)


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, spider_dir: Path
) -> Iterator[ClusterRun]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield run_cluster_trial(tmp_path_factory.mktemp("trial"), tiny_llama, monkeypatch)


# --------------------------------------------------------------------------------------------
# Finding 1: the real det.core.init (no TensorBoard) runs a whole trial.


def test_trial_completes_with_the_real_core_context(finished: ClusterRun) -> None:
    stand_in = finished.master
    training = stand_in.reports("training")
    assert [step for step, _ in training] == list(range(1, STEPS + 1))
    assert all("loss" in metrics for _, metrics in training)
    validation = stand_in.reports("validation")
    assert [step for step, _ in validation] == [STEPS]
    assert 0.0 <= validation[0][1]["eval_execution_accuracy"] <= 1.0
    assert stand_in.progress and stand_in.progress[-1] == pytest.approx(1.0)
    assert stand_in.run_prepares == 1
    assert finished.summary is not None and finished.summary["global_step"] == STEPS
    assert not finished.summary["preempted"] and not stand_in.acks


def test_checkpoint_is_registered_with_its_files_in_storage(finished: ClusterRun) -> None:
    ckpt = finished.checkpoint
    assert ckpt["state"] == "STATE_COMPLETED"
    assert ckpt["metadata"] == {"steps_completed": STEPS, "trial_id": 1}
    folder = finished.storage / ckpt["uuid"]
    on_disk = dict(iter_files(folder))
    files = {k: int(v) for k, v in ckpt["resources"].items() if not k.endswith("/")}
    # Every file the master lists is there at its size, and no other -- but metadata.json:
    # Determined 0.38.1's sharded upload reports the resources it gathered before writing it.
    assert files == {k: v for k, v in on_disk.items() if k != "metadata.json"}
    step = f"checkpoint-{STEPS}"
    for name in ("adapter_model.safetensors", "adapter_config.json", "text2sql.json"):
        assert f"{step}/{name}" in files
    assert json.loads((folder / "metadata.json").read_text())["steps_completed"] == STEPS


# --------------------------------------------------------------------------------------------
# Finding 2: evaluation reads a checkpoint exactly as the cluster stores it.


def test_evaluation_loads_a_checkpoint_in_the_cluster_layout(finished: ClusterRun) -> None:
    from cluster.checkpoint_info import verify_checkpoint_dir
    from trainer.checkpoint import load_checkpoint, read_manifest

    ckpt = finished.checkpoint
    stored = finished.storage / ckpt["uuid"]  # what `text2sql mirror` downloads, as it is
    verify_checkpoint_dir(stored, {k: int(v) for k, v in ckpt["resources"].items()})

    loaded = load_checkpoint(stored)
    assert loaded.is_adapter and loaded.path == stored / f"checkpoint-{STEPS}"
    manifest = read_manifest(stored)
    assert manifest["hyperparameters"]["training_args"]["max_steps"] == STEPS
    # The adapter that was trained, not a fresh one: its weights equal the stored file's.
    from safetensors.torch import load_file

    saved = load_file(str(loaded.path / "adapter_model.safetensors"))
    live = {
        k.replace(".default", ""): v for k, v in loaded.model.state_dict().items() if "lora_" in k
    }
    assert set(saved) == set(live) and saved
    assert all((live[name] == tensor).all() for name, tensor in saved.items())


def test_text2sql_evaluate_accepts_the_cluster_layout(
    finished: ClusterRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.cli import main

    stored = finished.storage / finished.checkpoint["uuid"]
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(stored),
            "--limit",
            "2",
            "--no-base",
            "--no-progress",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report  # written from the cluster checkpoint


# --------------------------------------------------------------------------------------------
# Finding 7: a pause is honoured while loading and at the next step.


def test_pause_while_loading_stops_before_the_first_step(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in = TrialMaster()
    stand_in.pause()  # `det e pause` while the container installs / the data is tokenized
    # logging_steps > max_steps: a check only in on_log would train every step first.
    run = run_cluster_trial(
        tmp_path,
        tiny_llama,
        monkeypatch,
        steps=12,
        stand_in=stand_in,
        overrides=[
            "training_args.logging_steps=20",
            "training_args.eval_steps=12",
            "training_args.save_steps=12",
        ],
    )
    assert run.summary is not None and run.summary["preempted"]
    assert run.summary["global_step"] == 0
    assert stand_in.reports("training") == [] and stand_in.progress == []
    assert stand_in.checkpoints == []  # nothing trained, nothing to save
    assert stand_in.acks == [run.container.allocation_id]  # the master may reschedule it


def test_pause_mid_training_stops_after_the_current_step(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in = TrialMaster()
    stand_in.pause_at_progress = 2 / 12  # the stand-in pauses once progress reports step 2
    run = run_cluster_trial(
        tmp_path,
        tiny_llama,
        monkeypatch,
        steps=12,
        stand_in=stand_in,
        overrides=[
            "training_args.logging_steps=10",
            "training_args.eval_steps=12",
            "training_args.save_steps=12",
        ],
    )
    assert run.summary is not None and run.summary["preempted"]
    stopped = run.summary["global_step"]
    # The signal reaches the trial through the long-poll within milliseconds; one step of
    # slack for that race. Checked only in on_log, it would run to step 10.
    assert 2 <= stopped <= 4, stopped
    assert [c["metadata"]["steps_completed"] for c in stand_in.checkpoints] == [stopped]
    assert stand_in.acks == [run.container.allocation_id]
    assert stand_in.reports("validation") == []  # no evaluation after a pause


@pytest.mark.slow
def test_mirror_experiment_id_takes_the_checkpoint_as_the_cluster_stored_it(
    finished: ClusterRun,
    master: FakeMaster,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`text2sql mirror --experiment-id` through the real SDK (tests/test_checkpoint_source.py's
    fake master serves the experiment and this checkpoint's record), downloading from the
    ``directory`` storage the trial wrote to: evaluated, logged, registered; again: a no-op."""
    from mlflow.tracking import MlflowClient

    from trainer.cli import main

    record = finished.checkpoint
    (_, validation), *_ = finished.master.reports("validation")
    (_, training), *_ = reversed(finished.master.reports("training"))
    entry = copy.deepcopy(master.checkpoints[0])
    entry.update(
        uuid=record["uuid"],
        resources=record["resources"],
        metadata=record["metadata"],
        state="STATE_COMPLETED",
        reportTime=record["reportTime"],
    )
    entry["training"].update(
        experimentConfig=finished.container.config,
        hparams=finished.container.hparams,
        trainingMetrics={"avgMetrics": training, "batchMetrics": []},
        validationMetrics={"avgMetrics": validation},
        searcherMetric=validation["eval_execution_accuracy"],
    )
    master.checkpoints = [entry]
    master.experiment["experiment"]["config"] = copy.deepcopy(finished.container.config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "mirror",
        "--experiment-id",
        str(EXPERIMENT_ID),
        "--tracking-uri",
        uri,
        "--work-dir",
        str(tmp_path / "work"),
        "--name",
        "tiny-cluster",
        "--no-progress",
    ]

    assert main(argv) == 0, capsys.readouterr().err
    downloaded = tmp_path / "work" / "checkpoint" / record["uuid"]
    assert (downloaded / f"checkpoint-{STEPS}" / "text2sql.json").is_file()
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions("name='tiny-cluster'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["text2sql.checkpoint_uuid"] == record["uuid"]

    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(client.search_model_versions("name='tiny-cluster'")) == 1
