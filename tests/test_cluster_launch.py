"""The distributed context comes from the launcher that ran, not from the config (finding 6).

A YAML may name a DeepSpeed config (``training_args.deepspeed``) and run under
``determined.launch.torch_distributed``: HF's Trainer drives DeepSpeed under torchrun. The
cluster path used to pick ``DistributedContext.from_deepspeed()`` from the config and died on
``KeyError: 'LOCAL_SIZE'`` (a variable only DeepSpeed's launcher sets). Both paths now call
`trainer.det_wiring.distributed_context`, which reads the launcher's own variables.

- fast: the rule on the variables each launcher sets; and ``run_on_cluster`` in this process
  with torchrun's variables and a DeepSpeed config, paused before it loads anything (so no
  process group outlives the test), gets past the context it used to die building;
- slow: a 2-slot DeepSpeed ZeRO-2 trial under the real ``determined.launch.torch_distributed``
  (torchrun, 2 CPU ranks, the stand-in master of tests/det_trial.py) trains, validates and
  stores both ranks' ZeRO shards.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_cluster_launch.py -q`` (``-m slow`` for the
trial).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dataset_utils.errors import UserError
from tests import tiny
from tests.det_trial import TrialContainer, TrialMaster, running_master
from trainer.det_wiring import launcher_from_env

REPO_ROOT = Path(__file__).resolve().parents[1]
ZERO2 = "experiments/ds_configs/zero2.json"
TORCH_DISTRIBUTED = "python -m determined.launch.torch_distributed python -m trainer.finetune"
# What each launcher puts in a rank's environment (rank 1 of 2 on one node).
TORCHRUN_ENV = {  # torch.distributed.run (torch/distributed/elastic/agent/server/api.py)
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "0",
    "GROUP_WORLD_SIZE": "1",
    "ROLE_RANK": "1",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "29400",
}
DEEPSPEED_ENV = {  # deepspeed/launcher/launch.py
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "0",
    "CROSS_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def test_launcher_is_read_from_its_own_variables() -> None:
    assert launcher_from_env({}) == "none"
    assert launcher_from_env(TORCHRUN_ENV) == "torch_distributed"
    assert launcher_from_env(DEEPSPEED_ENV) == "deepspeed"
    # A rank with only the common variables was not started by a launcher we know.
    common = {k: TORCHRUN_ENV[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    with pytest.raises(UserError, match="neither torchrun's"):
        launcher_from_env(common)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def zero2_trial(tmp: Path, model: Path, master_url: str, slots: int) -> TrialContainer:
    from trainer.experiment import load_experiment

    path = tiny.write_experiment(
        tmp / "exp.yaml",
        model,
        method="full",
        steps=2,
        slots=slots,
        lr=1e-3,
        entrypoint=TORCH_DISTRIBUTED,
    )
    exp = load_experiment(
        path,
        [
            f"training_args.output_dir={tmp / 'hf-output'}",
            f"training_args.deepspeed={ZERO2}",
            "efficiency.bf16=false",
            "efficiency.group_by_length=false",
        ],
        schema=False,
    )
    config = dict(exp.config)
    config["checkpoint_storage"] = {"type": "directory", "container_path": str(tmp / "storage")}
    # Relative to the context directory, as on a cluster (the trial's working directory).
    hparams = dict(exp.resolved_hparams)
    hparams["training_args"] = {**hparams["training_args"], "deepspeed": ZERO2}
    return TrialContainer(tmp / "container", config, hparams, master_url, slots=slots).write()


def test_torchrun_with_a_deepspeed_config_gets_its_context(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.job import run_on_cluster

    master = TrialMaster()
    master.pause()  # stop right after the Core API context is built: no process group here
    one_rank = {**TORCHRUN_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    one_rank.update(LOCAL_WORLD_SIZE="1", ROLE_RANK="0")
    for key in ("LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in one_rank.items():
        monkeypatch.setenv(key, value)
    with running_master(master) as m:
        container = zero2_trial(tmp_path, tiny_llama, m.url, slots=1)
        monkeypatch.chdir(REPO_ROOT)
        summary = run_on_cluster(container.activate(monkeypatch))
    assert summary["preempted"] and summary["global_step"] == 0
    assert m.acks == [container.allocation_id] and not m.unknown


@pytest.mark.slow
def test_deepspeed_config_under_the_torch_distributed_launcher(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    with running_master() as master:
        container = zero2_trial(tmp_path, tiny_llama, master.url, slots=2)
        proc = container.run(
            TORCH_DISTRIBUTED,
            cwd=REPO_ROOT,
            extra_env={
                "HF_HUB_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu",  # the stand-in for the GPU
                "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": "1",
            },
            timeout=900,
        )
    log = f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "KeyError" not in log
    assert not master.unknown and not master.errors, (master.unknown, master.errors)
    assert [s for s, _ in master.reports("training")] == [1, 2]  # the chief reports, once
    (validation,) = master.reports("validation")
    assert validation[0] == 2 and "eval_execution_accuracy" in validation[1]
    (ckpt,) = master.checkpoints
    files = set(ckpt["resources"])
    for rank in (0, 1):
        assert f"checkpoint-2/global_step2/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"checkpoint-2/rng_state_{rank}.pth" in files
    assert "checkpoint-2/model.safetensors" in files
