"""kill -9 a local training run at 20 seeded random points; nothing partial, resume finishes.

A real ``text2sql run`` of the tiny model (7 steps, a checkpoint every 2 steps, the run store
keeping the latest 2) is killed with SIGKILL at points drawn from a seeded RNG, of three kinds:

- ``step``: a random delay after the k-th training step report (lands in forward/backward,
  the optimizer step, metric writes, or the Trainer's own ``save_pretrained``);
- ``copy``: while the j-th file is copied into the run store's ``.tmp-<uuid>`` folder;
- ``gc``: while checkpoint garbage collection deletes the j-th file of an old checkpoint.

The copy/delete windows are widened and announced by ``tests/faults/hooks/sitecustomize.py``.
After every kill, every ``checkpoints/<uuid>`` folder must be complete and loadable; the next
launch must resume from the latest checkpoint (its first step is that step + 1); a launch that
finishes must report exactly ``max_steps``. Several kills hit one trial (resuming in between);
once a trial completes, the next kills hit a fresh one (``--new``).

Run: ``pytest -m slow tests/faults/test_kill9.py`` (``TEXT2SQL_FAULT_KILLS=n`` for fewer).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from tests import tiny
from tests.faults.harness import (
    FAST_OVERRIDES,
    Watched,
    base_env,
    checkpoint_problems,
    text2sql_cmd,
)
from trainer.run_store import ExperimentDir, TrialDir, read_jsonl

pytestmark = pytest.mark.slow

MAX_STEPS = 7  # not a multiple of SAVE_STEPS: the final checkpoint comes from the final save
SAVE_STEPS = 2
KILLS = int(os.environ.get("TEXT2SQL_FAULT_KILLS", "20"))
SEED = 20261123

STEP_LINE = re.compile(r"report_metrics\(group=training, steps_completed=(\d+), metrics=\{'loss'")
RESUME_LINE = re.compile(r"resuming from checkpoint \S+ \(step (\d+)\)")


def _check_store(trial: TrialDir) -> None:
    index = {e["uuid"]: e for e in read_jsonl(trial.index_file)}
    for folder in sorted(trial.checkpoints_dir.glob("*")):
        if folder.name.startswith(".tmp-"):
            continue  # a temp folder is never read, and is removed at the next start
        problems = checkpoint_problems(folder, index.get(folder.name))
        assert not problems, f"partial checkpoint {folder}: {problems}"


def _first_step(run: Watched) -> int | None:
    for line in run.lines:
        m = STEP_LINE.search(line)
        if m:
            return int(m.group(1))
    return None


def test_kill9_at_random_points_never_leaves_a_partial_checkpoint(
    tmp_path: Path, spider_dir: Path
) -> None:
    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml",
        model,
        name="kill9",
        steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        eval_steps=MAX_STEPS,
    )
    runs = tmp_path / "runs"
    env = base_env(TEXT2SQL_FAULT_HOOK_DELAY="0.03")
    rng = random.Random(SEED)
    kinds = (
        ["step"] * (KILLS - KILLS * 3 // 5) + ["copy"] * (KILLS * 2 // 5) + ["gc"] * (KILLS // 5)
    )
    rng.shuffle(kinds)
    log: list[dict] = []
    t_start = time.monotonic()
    new = False  # True once the current trial completed: the next launch starts a new one
    pending = list(kinds)
    while True:
        kind = pending.pop(0) if pending else None
        if kind is None and new:
            break
        exp_dir = ExperimentDir(runs / "kill9")
        before = exp_dir.resumable_trial()
        expected_resume = None
        if before is not None and not new:
            latest = before.latest_checkpoint()
            expected_resume = latest["steps_completed"] if latest else None
        args = ["run", str(exp), "--runs-dir", str(runs), "--no-mirror", "--no-progress"]
        args += [a for o in FAST_OVERRIDES for a in ("--set", o)]
        if new:
            args.append("--new")
        run = Watched(text2sql_cmd(*args), env=env, cwd=tmp_path)
        try:
            point: dict = {"kind": kind}
            if kind == "step":
                k = rng.randint(1, 2)
                delay = rng.uniform(0.0, 1.5)
                point.update(after_step_report=k, delay_s=round(delay, 3))
                hit = run.wait_for(lambda s: STEP_LINE.search(s) is not None, k)
                if hit:
                    time.sleep(delay)
            elif kind == "copy":
                j = rng.randint(1, 20)
                point.update(copy_file=j)
                hit = run.wait_for(lambda s: s.startswith("FAULT-HOOK copy"), j)
            elif kind == "gc":
                j = rng.randint(1, 10)
                point.update(unlink_file=j)
                hit = run.wait_for(
                    lambda s: s.startswith("FAULT-HOOK unlink") and "/.tmp-gc-" in s, j
                )
            else:
                hit = False  # the last launch: let it finish
            if hit:
                run.kill9()
                rc = None
            else:
                rc = run.wait()
        except BaseException:
            run.kill9()  # never leave a training run behind
            raise
        trial = next(t for t in reversed(exp_dir.trials()))
        point.update(
            trial=trial.trial_id,
            killed=hit,
            rc=rc,
            seconds=round(time.monotonic() - run.t0, 1),
            tmp_left=sorted(p.name[:12] for p in trial.checkpoints_dir.glob(".tmp-*")),
        )
        log.append(point)
        _check_store(trial)

        m = next((RESUME_LINE.search(s) for s in run.lines if RESUME_LINE.search(s)), None)
        first = _first_step(run)
        # A launch killed at start-up (while it removes a killed GC's leftovers, before it
        # logs where it resumes) has nothing to show; one that trained or finished must have
        # resumed from the latest checkpoint.
        if expected_resume is not None and (not hit or first is not None):
            assert m is not None, f"did not resume:\n{run.text[-3000:]}"
            # >=: a checkpoint renamed into place but not yet indexed is adopted at start.
            assert int(m.group(1)) >= expected_resume
        if m is not None and first is not None:
            assert first == int(m.group(1)) + 1, f"resumed at {m.group(1)}, first step {first}"
        if not hit:
            assert rc == 0, run.text[-3000:]
            summary = json.loads((trial.path / "summary.json").read_text())
            assert summary["global_step"] == MAX_STEPS
            assert trial.info()["state"] == "COMPLETED"
            assert not list(trial.checkpoints_dir.glob(".tmp-*"))
            latest = trial.latest_checkpoint()
            assert latest is not None and latest["steps_completed"] == MAX_STEPS
            state = json.loads(
                (trial.checkpoint_path(latest["uuid"]) / "trainer_state.json").read_text()
            )
            assert state["global_step"] == MAX_STEPS
            steps = {s for s, _ in trial.metric_history()["training"] if s >= 1}
            assert steps >= set(range(1, MAX_STEPS + 1))
            if kind is not None:
                pending.insert(0, kind)  # the run finished first: try this kind again
            new = True
        else:
            new = False
    killed = [p for p in log if p["killed"]]
    print(f"\n{len(killed)} kills in {time.monotonic() - t_start:.0f} s:")
    for p in log:
        print(json.dumps(p))
    assert len(killed) >= KILLS * 0.9, "too many kill points were never reached"
