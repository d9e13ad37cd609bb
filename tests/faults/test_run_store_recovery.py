"""Fast checks of the run store's crash recovery, one crash window at a time.

``test_kill9.py`` kills real runs at random points; these tests put the run store directly in
each state a kill can leave behind and check what the next start makes of it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from trainer.run_store import ExperimentDir, TrialDir, append_jsonl, read_jsonl


def _trial(tmp_path: Path) -> TrialDir:
    return ExperimentDir(tmp_path / "exp").new_trial()


def _fake_checkpoint(tmp_path: Path, step: int) -> Path:
    src = tmp_path / f"hf-checkpoint-{step}"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"w" * (100 + step))
    (src / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return src


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    f = tmp_path / "checkpoints.jsonl"
    append_jsonl(f, {"uuid": "a", "steps_completed": 1})
    with f.open("a") as fh:
        fh.write('{"uuid": "b", "steps_comp')  # killed mid-write: no newline
    append_jsonl(f, {"uuid": "c", "steps_completed": 3})
    assert [r["uuid"] for r in read_jsonl(f)] == ["a", "c"]


def test_temp_folders_are_removed_and_never_listed(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    trial.store_checkpoint(_fake_checkpoint(tmp_path, 2), {"steps_completed": 2})
    half_copied = trial.checkpoints_dir / ".tmp-1234"
    half_copied.mkdir()
    (half_copied / "adapter_model.safetensors").write_bytes(b"w")
    half_deleted = trial.checkpoints_dir / ".tmp-gc-5678"
    half_deleted.mkdir()
    assert [c["steps_completed"] for c in trial.checkpoints()] == [2]
    removed = trial.clean_partial()
    assert sorted(p.name for p in removed) == [".tmp-1234", ".tmp-gc-5678"]
    assert sorted(p.name for p in trial.checkpoints_dir.iterdir()) == [
        trial.checkpoints()[0]["uuid"]
    ]


def test_a_complete_but_unindexed_checkpoint_is_adopted(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    first = trial.store_checkpoint(_fake_checkpoint(tmp_path, 2), {"steps_completed": 2})
    second = trial.store_checkpoint(_fake_checkpoint(tmp_path, 4), {"steps_completed": 4})
    # Killed after the rename, before the index line was written.
    lines = trial.index_file.read_text().splitlines()
    trial.index_file.write_text(lines[0] + "\n")
    assert [c["uuid"] for c in trial.checkpoints()] == [first["uuid"]]
    trial.clean_partial()
    latest = trial.latest_checkpoint()
    assert latest is not None and latest["uuid"] == second["uuid"]
    assert latest["steps_completed"] == 4
    assert latest["resources"] == second["resources"]
    trial.clean_partial()  # idempotent: no second index line
    assert len(read_jsonl(trial.index_file)) == 2


def test_gc_renames_before_deleting(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shutil

    trial = _trial(tmp_path)
    for step in (2, 4, 6):
        trial.store_checkpoint(_fake_checkpoint(tmp_path, step), {"steps_completed": step})
    seen: list[str] = []

    def crash_in_rmtree(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(path).name)
        raise KeyboardInterrupt  # stands in for kill -9 in the middle of the delete

    monkeypatch.setattr(shutil, "rmtree", crash_in_rmtree)
    with contextlib.suppress(KeyboardInterrupt):
        trial.prune(keep_latest=2, keep_best=0, metric=None, smaller=True)
    monkeypatch.undo()
    # The doomed checkpoint was out of sight before a single file was deleted.
    assert seen and seen[0].startswith(".tmp-gc-")
    assert [c["steps_completed"] for c in trial.checkpoints()] == [4, 6]
    trial.clean_partial()
    assert len(list(trial.checkpoints_dir.iterdir())) == 2


def test_resuming_a_trial_killed_after_its_last_checkpoint_trains_nothing(
    tmp_path: Path, spider_dir: Path
) -> None:
    """Found by test_kill9: transformers 5.23 resumed from a checkpoint at max_steps trains
    step max_steps + 1. The trainer must see there is nothing left and change nothing."""
    import subprocess

    from tests import tiny
    from tests.faults.harness import FAST_OVERRIDES, base_env, text2sql_cmd

    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(tmp_path / "exp.yaml", model, name="done", steps=2)
    runs = tmp_path / "runs"
    args = ["run", str(exp), "--runs-dir", str(runs), "--no-mirror", "--no-progress"]
    args += [a for o in FAST_OVERRIDES for a in ("--set", o)]
    env = base_env()

    def launch() -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            text2sql_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    launch()
    trial = ExperimentDir(runs / "done").trials()[-1]
    index = read_jsonl(trial.index_file)
    assert [e["steps_completed"] for e in index] == [2]
    trial.update_info(state="ACTIVE")  # as if killed after the checkpoint, before finishing
    second = launch()
    out = second.stdout + second.stderr
    assert "resuming from checkpoint" in out and "nothing to train" in out
    assert "steps_completed=3" not in out
    assert read_jsonl(trial.index_file) == index  # no new (untrained) checkpoint
    assert trial.info()["state"] == "COMPLETED"
    assert json.loads((trial.path / "summary.json").read_text())["global_step"] == 2
