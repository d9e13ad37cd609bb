"""`FixedDetCallback` and `run_on_cluster` against a Determined trial container, minus the master.

A Determined task container finds out about its trial from JSON files the agent writes into
``/run/determined/info/`` (``cluster.json``, ``trial.json``, ``rendezvous.json``,
``resources.json``); ``det.get_cluster_info()`` loads them once via ``ClusterInfo._from_file``
and caches the result in ``determined._info._info``. The `trial_container` fixture writes
those files, as the agent would, for a trial of a real experiment YAML and points
Determined's own loader at them. The Core API context is Determined's own off-cluster one
(`DummyCheckpointContext` over a shared_fs `SharedFSStorageManager`): its
``checkpoint.download`` is the same `CheckpointContext.download` a trial runs on a cluster,
and it copies real files out of a checkpoint-storage folder laid out as Determined lays it
out (``<storage>/<uuid>/checkpoint-7/...``). Nothing contacts a master or the network.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_det_callback.py -q``
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import determined as det
import pytest
from determined import _info, core
from determined.common.storage import SharedFSStorageManager

from trainer.callbacks import fixed_det_callback_class
from trainer.config import Hyperparameters
from trainer.experiment import Experiment, load_experiment
from trainer.training import RunEnv, build_training_args

REPO_ROOT = Path(__file__).resolve().parents[1]
ASHA_YAML = REPO_ROOT / "experiments" / "lora-asha.yaml"
CHECKPOINT_UUID = "7f2f3c1e-3b1a-4c55-9a63-0c9a2d1b0007"


def _load(path: Path, output_dir: Path, *extra: str) -> Experiment:
    # schema=False: Determined's schema check is tests/test_experiments.py's job (and needs
    # ../shared); here the YAML only supplies the searcher config and hyperparameters.
    return load_experiment(path, [f"training_args.output_dir={output_dir}", *extra], schema=False)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def trial_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., det.ClusterInfo]]:
    """Lay out ``/run/determined/info`` for a TRIAL task and load it with Determined's loader.

    Call it with the experiment (its config and resolved hyperparameters are what the master
    puts in ``trial.json``) and the ``latest_checkpoint`` uuid the master would hand a
    resumed trial.
    """
    info_dir = tmp_path / "run" / "determined" / "info"
    info_dir.mkdir(parents=True)
    # The loaders' default paths are bound at definition time; redirect exactly those.
    for cls, name in (
        (_info.ClusterInfo, "cluster.json"),
        (_info.TrialInfo, "trial.json"),
        (_info.RendezvousInfo, "rendezvous.json"),
        (_info.ResourcesInfo, "resources.json"),
    ):
        monkeypatch.setattr(cls._from_file.__func__, "__defaults__", (str(info_dir / name),))

    def make(exp: Experiment, latest_checkpoint: str | None = None) -> det.ClusterInfo:
        _write_json(
            info_dir / "cluster.json",
            {
                # Port 1 on localhost: nothing here may talk to a master, and nothing does.
                "master_url": "http://127.0.0.1:1",
                "cluster_id": "test-cluster",
                "agent_id": "test-agent",
                "slot_ids": [0],
                "task_id": "1.2",
                "allocation_id": "1.2.1",
                "session_token": "not-a-real-token",
                "task_type": "TRIAL",
                "master_cert_name": None,
                "master_cert_file": None,
                "latest_checkpoint": latest_checkpoint,
            },
        )
        _write_json(
            info_dir / "trial.json",
            {
                "trial_id": 2,
                "experiment_id": 1,
                "trial_seed": 1234,
                "hparams": exp.resolved_hparams,
                "config": exp.config,
                "steps_completed": 7 if latest_checkpoint else 0,
                "trial_run_id": 2 if latest_checkpoint else 1,
                "debug": False,
                "inter_node_network_interface": None,
            },
        )
        _write_json(
            info_dir / "rendezvous.json",
            {
                "container_addrs": ["127.0.0.1"],
                "container_rank": 0,
                "container_slot_counts": [1],
            },
        )
        _write_json(info_dir / "resources.json", {"gpu_uuids": []})
        monkeypatch.setattr(_info, "_info", "unloaded")  # det.get_cluster_info() re-reads
        info = det.get_cluster_info()
        assert info is not None and info.task_type == "TRIAL"
        return info

    yield make


@pytest.fixture
def checkpoint_storage(tmp_path: Path) -> Path:
    """A shared_fs checkpoint store holding one checkpoint as DetCallback uploads it."""
    root = tmp_path / "checkpoint-storage"
    ckpt = root / CHECKPOINT_UUID / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 7, "max_steps": 640}))
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (ckpt / "optimizer.pt").write_bytes(b"\x01" * 32)
    # The metadata Determined writes beside the files, with the trial's steps_completed.
    (root / CHECKPOINT_UUID / "metadata.json").write_text(
        json.dumps({"steps_completed": 7, "trial_id": 2})
    )
    return root


def core_context(storage: Path) -> core.Context:
    """Determined's own off-cluster Core API context over a shared_fs checkpoint store."""
    distributed = core.DummyDistributedContext()
    return core.Context(
        checkpoint=core.DummyCheckpointContext(distributed, SharedFSStorageManager(str(storage))),
        distributed=distributed,
    )


def training_args(hp: Hyperparameters, output_dir: Path) -> Any:
    # The same TrainingArguments run_on_cluster builds and hands to the callback.
    return build_training_args(
        hp, RunEnv(output_dir=str(output_dir), searcher_metric="eval_execution_accuracy")
    )


# --------------------------------------------------------------------------------------------
# (a) ASHA searcher configs.


def test_upstream_det_callback_crashes_on_asha(
    tmp_path: Path, trial_container: Callable[..., det.ClusterInfo], checkpoint_storage: Path
) -> None:
    from determined.transformers import DetCallback

    exp = _load(ASHA_YAML, tmp_path / "out")
    assert exp.config["searcher"]["name"] == "adaptive_asha"
    trial_container(exp)
    args = training_args(exp.hparams, tmp_path / "out")
    # The bug our fix exists for: DetCallback never creates the list it appends to.
    with pytest.raises(AttributeError, match="required_metrics"):
        DetCallback(core_context(checkpoint_storage), args)


def test_fixed_det_callback_accepts_asha(
    tmp_path: Path, trial_container: Callable[..., det.ClusterInfo], checkpoint_storage: Path
) -> None:
    exp = _load(ASHA_YAML, tmp_path / "out")
    trial_container(exp)
    args = training_args(exp.hparams, tmp_path / "out")

    callback = fixed_det_callback_class()(core_context(checkpoint_storage), args)

    assert callback.searcher_metric == "eval_execution_accuracy"
    assert callback.time_metric == "batches"
    # batches is reported with every metric group, so nothing else is required.
    assert callback.required_metrics == ["batches"]
    assert callback.resume_from_checkpoint is None  # a fresh trial: nothing downloaded
    assert not (tmp_path / "out").exists()


def test_fixed_det_callback_still_rejects_a_length_mismatch(
    tmp_path: Path, trial_container: Callable[..., det.ClusterInfo], checkpoint_storage: Path
) -> None:
    # The fix must only create the list, not skip the check: an ASHA max_time that is not
    # the trainer's max_steps would make rungs compare trials at the wrong points.
    exp = _load(ASHA_YAML, tmp_path / "out")
    trial_container(exp)
    # (load_experiment would refuse this config itself; build the mismatch behind its back.)
    short = dataclasses.replace(
        exp.hparams, training_args={**exp.hparams.training_args, "max_steps": 100}
    )
    args = training_args(short, tmp_path / "out")
    with pytest.raises(ValueError, match=r"batches=100 != batches=640"):
        fixed_det_callback_class()(core_context(checkpoint_storage), args)


# --------------------------------------------------------------------------------------------
# (b) latest_checkpoint: download and resume.


def test_latest_checkpoint_is_downloaded_and_resumed_from(
    tmp_path: Path, trial_container: Callable[..., det.ClusterInfo], checkpoint_storage: Path
) -> None:
    out = tmp_path / "out"
    exp = _load(ASHA_YAML, out)
    info = trial_container(exp, latest_checkpoint=CHECKPOINT_UUID)
    assert info.latest_checkpoint == CHECKPOINT_UUID
    args = training_args(exp.hparams, out)

    callback = fixed_det_callback_class()(core_context(checkpoint_storage), args)

    expected = out / "checkpoint-7"
    assert callback.resume_from_checkpoint == str(expected)
    assert args.resume_from_checkpoint == str(expected)
    source = checkpoint_storage / CHECKPOINT_UUID / "checkpoint-7"
    for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt"):
        assert (expected / name).read_bytes() == (source / name).read_bytes()


# --------------------------------------------------------------------------------------------
# (c) run_on_cluster hands the downloaded checkpoint to Trainer.train (trainer.job).


def test_main_passes_the_checkpoint_to_trainer_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last link: the job's train() gives env.resume_from_checkpoint to Trainer.train
    unchanged."""
    import trainer.job as job

    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    exp = _load(ASHA_YAML, out)
    calls: list[dict[str, Any]] = []

    class FakeTrainer:
        def __init__(self) -> None:
            self.args = type("Args", (), {"output_dir": str(out)})()
            self.state = type(
                "State", (), {"global_step": 7, "max_steps": 640, "log_history": [{"loss": 1.0}]}
            )()

        def train(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return type("Result", (), {"training_loss": 1.0})()

    class FakeData:
        report: dict[str, Any] = dict.fromkeys(
            (
                "n_train",
                "n_valid",
                "n_test",
                "duplicates_removed",
                "dropped_too_long_train",
                "dropped_too_long_valid",
                "dropped_too_long_test",
                "cache",
            ),
            0,
        )
        plan = None
        examples: dict[str, Any] = {"valid": []}

    class FakeModel:
        pass

    monkeypatch.setattr(job, "load_tokenizer", lambda args: object())
    monkeypatch.setattr(job, "count_parameters", lambda model: (1, 2))
    monkeypatch.setattr(job, "build_datasets", lambda hp, tok: FakeData())
    monkeypatch.setattr(job, "build_model", lambda hp, tok: FakeModel())
    monkeypatch.setattr(job, "build_training_args", lambda hp, env: None)
    monkeypatch.setattr(job, "CheckpointManifest", lambda *a: object())
    monkeypatch.setattr(job, "build_generation_metrics", lambda *a: None)
    monkeypatch.setattr(job, "build_trainer", lambda *a: FakeTrainer())

    env = RunEnv(output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-7"))
    summary = job.train(exp.hparams, env)

    assert calls == [{"resume_from_checkpoint": str(out / "checkpoint-7")}]
    assert summary["global_step"] == 7
