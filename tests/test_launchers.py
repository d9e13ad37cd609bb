"""Multi-process training on CPU through the real launchers: torchrun (DDP, gloo) and DeepSpeed.

Each test drives ``text2sql run`` as a user does -- a subprocess; for ``slots_per_trial=2`` the
local runner starts ``torchrun`` or the ``deepspeed`` launcher (``DS_ACCELERATOR=cpu``) -- and
reads what happened from the run store (``summary.json``, ``metrics.jsonl``, checkpoints).

Run: ``HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_launchers.py``
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCH_DISTRIBUTED = "python -m determined.launch.torch_distributed python -m trainer.finetune"
DEEPSPEED = "python -m determined.launch.deepspeed python -m trainer.finetune"
# Reproducible numerics: fp32 (bf16 "auto" is decided by a timing probe), no dropout (the tiny
# YAML's LoRA dropout is 0), no length-grouped or prefix-grouped sampler (their batches depend
# on the per-device batch size, so 1 x 8 and 2 x 4 would see different batches).
DETERMINISTIC = [
    "efficiency.bf16=false",
    "efficiency.prefix_sharing=false",
    "efficiency.group_by_length=false",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.cpu_count() is None or os.cpu_count() < 2, reason="needs 2 CPUs"),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def text2sql_run(
    exp: Path, runs: Path, overrides: list[str], *, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "trainer.cli", "run", str(exp), "--runs-dir", str(runs)]
    cmd += ["--no-eval", "--no-progress"]  # training only
    for o in overrides:
        cmd += ["--set", o]
    # Its own session, so that a run that hangs (a collective one rank never joins) takes its
    # launcher and every rank down with it at the timeout, instead of leaving them behind. The
    # runner starts the launcher in a session of its own too (so it can forward SIGTERM to the
    # ranks), so the ranks are found as descendants: left alive they would hold the pipes open
    # and `communicate` would wait for ever (seen on the old ZeRO-3 deadlock of issue 16).
    child = subprocess.Popen(
        cmd,
        cwd=exp.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # deepspeed's dependency

        family = psutil.Process(child.pid).children(recursive=True)
        os.killpg(child.pid, signal.SIGKILL)
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out, err = child.communicate(timeout=60)
        raise AssertionError(
            f"text2sql run did not finish in {timeout:.0f} s\n{out[-6000:]}\n{err[-6000:]}"
        ) from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def trial_dir(runs: Path, name: str = "tiny", n: int = 1) -> Path:
    return runs / name / f"trial-{n}"


def summary(trial: Path) -> dict[str, Any]:
    return json.loads((trial / "summary.json").read_text())


def step_losses(trial: Path) -> dict[int, float]:
    """Training loss by step from metrics.jsonl (a resumed run's later report wins)."""
    out: dict[int, float] = {}
    for line in (trial / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["group"] == "training" and "loss" in r["metrics"]:
            out[int(r["steps_completed"])] = float(r["metrics"]["loss"])
    return out


def loss_reports(trial: Path) -> list[int]:
    """The step of every training-loss report, in order (a resumed run adds its own)."""
    return [
        int(r["steps_completed"])
        for r in map(json.loads, (trial / "metrics.jsonl").read_text().splitlines())
        if r["group"] == "training" and "loss" in r["metrics"]
    ]


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


@pytest.mark.parametrize(
    ("single", "per_rank"),
    [
        # Global batch 8: one process x 8 rows vs 2 ranks x 4 rows.
        (["training_args.per_device_train_batch_size=8"], [*DETERMINISTIC]),
        # The default samplers (prefix-grouped batches): 1 process x 4 rows x 2 accumulation
        # steps vs 2 ranks x 4 rows -- the same batches of 4, so the same global batch.
        (["training_args.gradient_accumulation_steps=2"], ["efficiency.bf16=false"]),
    ],
    ids=["batch8-vs-2x4", "accum2-vs-2x4-prefix-sharing"],
)
def test_ddp_two_ranks_match_one_process(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path, single: list[str], per_rank: list[str]
) -> None:
    steps = 6
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml", tiny_llama, steps=steps, entrypoint=TORCH_DISTRIBUTED
    )
    shared = [o for o in per_rank if o not in single]
    one = text2sql_run(exp, tmp_path / "one", [*shared, *single, "resources.slots_per_trial=1"])
    two = text2sql_run(exp, tmp_path / "two", [*shared, "resources.slots_per_trial=2"])

    # One process in-process; two ranks really ran under torchrun, as DDP over 2 processes.
    assert "launching" not in one.stdout
    assert "torch.distributed.run --nproc_per_node 2" in two.stdout
    s1, s2 = summary(trial_dir(tmp_path / "one")), summary(trial_dir(tmp_path / "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s2["engine"] == "DistributedDataParallel"
    assert s1["global_step"] == s2["global_step"] == steps

    l1, l2 = step_losses(trial_dir(tmp_path / "one")), step_losses(trial_dir(tmp_path / "two"))
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    # Same data, same seed, same (global-token) loss normalisation: the same training run up
    # to float reduction order. Measured here: max relative difference ~2e-7.
    diff = max_rel_diff(l2, l1)
    print(f"DDP vs single process: max relative loss difference {diff:.2e}")
    assert diff < 1e-4, (l1, l2)
    # ...and it is training: the losses are not all the same number.
    assert len({round(v, 4) for v in l1.values()}) > 1


def test_deepspeed_two_ranks_share_prefixes_like_one_process(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    """Prefix sharing under DeepSpeed (ZeRO-2, 2 CPU ranks): the segments reach the attention
    through the DeepSpeed engine's forward, so the run is the single-process run with the same
    global batches (1 process x 4 rows x 2 accumulation steps, no DeepSpeed)."""
    steps = 4
    ds_config = REPO_ROOT / "experiments" / "ds_configs" / "zero2.json"
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml", tiny_llama, method="full", steps=steps, lr=1e-3, entrypoint=DEEPSPEED
    )
    common = ["efficiency.bf16=false"]  # prefix_sharing and its sampler: the defaults
    one = text2sql_run(
        exp,
        tmp_path / "one",
        [*common, "resources.slots_per_trial=1", "training_args.gradient_accumulation_steps=2"],
    )
    two = text2sql_run(
        exp,
        tmp_path / "two",
        [*common, "resources.slots_per_trial=2", f"training_args.deepspeed={ds_config}"],
    )
    # A DeepSpeed-launcher experiment always runs under the launcher (as on a cluster), one
    # process for one slot; without training_args.deepspeed that process trains without it.
    assert "deepspeed --num_gpus 2" in two.stdout and "deepspeed --num_gpus 1" in one.stdout
    s1, s2 = summary(trial_dir(tmp_path / "one")), summary(trial_dir(tmp_path / "two"))
    assert s1["engine"] != "DeepSpeedEngine" and s1["world_size"] == 1
    assert s2["engine"] == "DeepSpeedEngine" and s2["world_size"] == 2
    l1, l2 = step_losses(trial_dir(tmp_path / "one")), step_losses(trial_dir(tmp_path / "two"))
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    diff = max_rel_diff(l2, l1)
    print(f"ZeRO-2 prefix sharing vs single process: max relative loss difference {diff:.2e}")
    assert diff < 1e-4, (l1, l2)
    assert len({round(v, 4) for v in l1.values()}) > 1


def _param_changes(checkpoint: Path, base_dir: Path) -> tuple[int, int]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trained = load_file(str(checkpoint / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    changed = sum(1 for k, v in trained.items() if not torch.equal(v, base[k]))
    return changed, len(trained)


def _batch_losses(
    exp: Path, overrides: list[str], base_dir: Path, trained_dir: Path
) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    from trainer.experiment import load_experiment
    from trainer.hf_trainer import CompletionCollator
    from trainer.training_data import build_datasets

    hp = load_experiment(exp, overrides, schema=False).hparams
    tok = tiny.tokenizer()
    rows = build_datasets(hp, tok).train.select(range(8))
    batch = CompletionCollator(tok.pad_token_id)([dict(r) for r in rows])
    out = []
    for d in (base_dir, trained_dir):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(float(model(**batch).loss))
    return out[0], out[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_cpu_ranks(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path, stage: int
) -> None:
    """Full fine-tune under ``deepspeed --num_gpus 2`` on CPU with the repo's ZeRO configs;
    a checkpoint from step 2 is then resumed (DeepSpeed engine state, sharded optimizer) and
    reproduces the uninterrupted run's losses."""
    from trainer.run_store import TrialDir

    steps = 4
    ds_config = REPO_ROOT / "experiments" / "ds_configs" / f"zero{stage}.json"
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml",
        tiny_llama,
        method="full",
        steps=steps,
        save_steps=2,
        lr=1e-3,
        entrypoint=DEEPSPEED,
    )
    overrides = [
        *DETERMINISTIC,
        "resources.slots_per_trial=2",
        f"training_args.deepspeed={ds_config}",
    ]
    runs = tmp_path / "runs"
    proc = text2sql_run(exp, runs, overrides)
    assert "deepspeed --num_gpus 2" in proc.stdout
    trial = TrialDir(trial_dir(runs))
    s = summary(trial.path)
    assert s["engine"] == "DeepSpeedEngine" and s["world_size"] == 2
    assert s["global_step"] == steps

    losses = step_losses(trial.path)
    assert sorted(losses) == list(range(1, steps + 1))

    # Checkpoints at steps 2 and 4 (save_trial_latest: 2), each with DeepSpeed's per-rank
    # ZeRO shards and the consolidated HF weights, every one of which changed.
    cps = {c["steps_completed"]: c for c in trial.checkpoints()}
    assert sorted(cps) == [2, steps]
    final = trial.checkpoint_path(cps[steps]["uuid"])
    shards = sorted(p.name for p in (final / f"global_step{steps}").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    changed, total = _param_changes(final, tiny_llama)
    assert changed == total, f"{total - changed} of {total} weights unchanged"
    # Loss went down: the trained weights score the same training rows better than the base
    # (one fixed batch for both, so batch-to-batch noise in the step losses cannot fool it).
    base_loss, trained_loss = _batch_losses(exp, overrides, tiny_llama, final)
    print(f"ZeRO-{stage}: loss on 8 training rows {base_loss:.4f} -> {trained_loss:.4f}")
    assert trained_loss < base_loss

    # Resume: drop the step-4 checkpoint as if the run had died after step 2, and re-run
    # the same command. The trainer loads the DeepSpeed checkpoint and replays steps 3-4.
    import shutil

    shutil.rmtree(final)
    trial.update_info(state="PAUSED")
    again = text2sql_run(exp, runs, overrides)
    assert "(resuming)" in again.stdout and "(step 2)" in again.stdout
    assert summary(trial.path)["global_step"] == steps
    # It continued from step 2 (steps 1-2 were not trained again), it did not start over.
    assert loss_reports(trial.path) == [1, 2, 3, 4, 3, 4]
    after = step_losses(trial.path)  # steps 3-4 reported again, by the resumed run
    resumed = {k: after[k] for k in range(3, steps + 1)}
    diff = max_rel_diff(resumed, {k: losses[k] for k in resumed})
    print(f"ZeRO-{stage} resumed vs uninterrupted: max relative loss difference {diff:.2e}")
    assert diff < 1e-4, (resumed, losses)
