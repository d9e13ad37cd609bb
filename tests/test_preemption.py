"""Preemption of a local run, and ``text2sql run --prepare-only``.

SIGTERM (what Determined, Kubernetes or a batch scheduler send before killing a task) makes a
running ``text2sql run`` finish its current step, store a checkpoint and exit 0; the same
command then resumes from that checkpoint and ends at the configured step count with exactly
the losses of a run that was never interrupted (same batches: the samplers are seeded per
epoch and the Trainer skips the batches already trained; same RNG: restored from the
checkpoint).

Run: ``HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_preemption.py`` (the
``--prepare-only`` test is in the default tier).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
STOP_AFTER = 5  # SIGTERM once this many steps are logged


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def _run_cmd(exp: Path, runs: Path) -> list[str]:
    # 24 examples -> ~19 training rows, ~5 batches an epoch: 16 steps cross 3 epoch
    # boundaries, so resuming must restore the epoch's data order, not just skip batches.
    sets = ["efficiency.bf16=false", "data.number_of_samples=24"]
    cmd = [sys.executable, "-m", "trainer.cli", "run", str(exp), "--runs-dir", str(runs)]
    cmd += ["--no-eval", "--no-progress"]  # training only
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _losses(trial: Path) -> dict[int, float]:
    """Training loss by step (a resumed run's report of a step replaces the earlier one)."""
    out: dict[int, float] = {}
    metrics = trial / "metrics.jsonl"
    if not metrics.is_file():
        return out
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if r["group"] == "training" and "loss" in r["metrics"]:
            out[int(r["steps_completed"])] = float(r["metrics"]["loss"])
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_identically(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    from trainer.run_store import TrialDir

    exp = tiny.write_experiment(tmp_path / "exp.yaml", tiny_llama, steps=STEPS, lr=1e-2)

    # The reference: one uninterrupted run.
    ref = subprocess.run(
        _run_cmd(exp, tmp_path / "ref"),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert ref.returncode == 0, ref.stderr[-5000:]
    expected = _losses(tmp_path / "ref" / "tiny" / "trial-1")
    assert sorted(expected) == list(range(1, STEPS + 1))

    # The same command, sent SIGTERM once it has logged a few steps.
    runs = tmp_path / "runs"
    trial = TrialDir(runs / "tiny" / "trial-1")
    proc = subprocess.Popen(
        _run_cmd(exp, runs),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 1800
        while max(_losses(trial.path), default=0) < STOP_AFTER:
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "no training progress in 30 minutes"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        exit_s = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"exited {exit_s:.1f} s after SIGTERM with code {proc.returncode}")
    assert proc.returncode == 0, out[-5000:]
    assert exit_s < 60
    assert "preempted at step" in out
    info = trial.info()
    assert info["state"] == "PAUSED"
    stopped_at = info["steps_completed"]
    assert STOP_AFTER <= stopped_at < STEPS
    latest = trial.latest_checkpoint()
    assert latest is not None and latest["steps_completed"] == stopped_at
    meta = json.loads((trial.checkpoint_path(latest["uuid"]) / "metadata.json").read_text())
    assert meta["preempted"] is True

    # Re-running the same command resumes from that checkpoint and finishes the trial.
    again = subprocess.run(
        _run_cmd(exp, runs),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert again.returncode == 0, again.stderr[-5000:]
    assert "(resuming)" in again.stdout
    assert trial.info()["state"] == "COMPLETED"
    summary = json.loads((trial.path / "summary.json").read_text())
    assert summary["global_step"] == summary["max_steps"] == STEPS
    assert trial.latest_checkpoint()["steps_completed"] == STEPS

    # It continued after the checkpoint, it did not start over: every step up to the
    # preemption was trained (and reported) once.
    reports = [
        int(r["steps_completed"])
        for r in map(json.loads, (trial.path / "metrics.jsonl").read_text().splitlines())
        if r["group"] == "training" and "loss" in r["metrics"]
    ]
    assert reports[:stopped_at] == list(range(1, stopped_at + 1))
    assert all(reports.count(s) == 1 for s in range(1, stopped_at + 1)), reports
    assert f"(step {stopped_at})" in again.stdout
    got = _losses(trial.path)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    print(f"resumed after step {stopped_at}: max |loss - uninterrupted loss| = {worst:.2e}")
    assert worst <= 1e-4, {s: (got[s], expected[s]) for s in expected if got[s] != expected[s]}


def test_prepare_only_tokenizes_validates_and_trains_nothing(
    tmp_path: Path,
    tiny_llama: Path,
    spider_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trainer.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TEXT2SQL_CACHE", str(tmp_path / "cache"))
    exp = tiny.write_experiment(tmp_path / "exp.yaml", tiny_llama)
    runs = tmp_path / "runs"
    argv = ["run", str(exp), "--runs-dir", str(runs), "--prepare-only", "--no-progress"]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prepared:" in out and "data cache miss" in out and "nothing trained" in out
    assert not runs.exists()  # no trial folder, no checkpoint, no MLflow store
    cached = list((tmp_path / "cache" / "datasets").glob("*/report.json"))
    assert len(cached) == 1
    report = json.loads(cached[0].read_text())
    assert report["n_train"] > 0 and f"{report['n_train']} train" in out

    # The training run (here: a second prepare) starts from the tokenized cache.
    assert main(argv) == 0
    assert "data cache hit" in capsys.readouterr().out

    # And it fails like the real run would, before anything is loaded: one line, exit != 0.
    bad = ["--set", "model.name_or_path=" + str(tmp_path / "no-such-model")]
    assert main([*argv, *bad]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no-such-model" in err[0]
