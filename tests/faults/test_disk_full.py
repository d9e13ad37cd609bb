"""Disk full while writing a checkpoint: one clear error, the previous checkpoint intact.

The run folder is a small tmpfs mounted in a private mount namespace (``unshare -rm``: no root
needed where user namespaces are allowed, nothing to clean up: the mount dies with the
namespace). Training runs there; as soon as the first checkpoint is stored, the filesystem is
filled to within 1 MiB, so the next checkpoint (several MiB) cannot be written. The run must
exit non-zero with exactly one ``error: no space left on device ...`` line and no traceback,
the first checkpoint must still be complete and loadable, and - once there is space again -
the same command must resume from it and finish.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.faults.harness import FAST_OVERRIDES, base_env, checkpoint_problems, text2sql_cmd
from trainer.run_store import ExperimentDir

pytestmark = pytest.mark.slow

MAX_STEPS = 6
SAVE_STEPS = 3

FILL = """
import os, sys
path = sys.argv[1]
st = os.statvfs(os.path.dirname(path))
free = st.f_bavail * st.f_frsize - (1 << 20)
with open(path, "wb") as fh:
    while free > 0:
        n = min(free, 1 << 20)
        fh.write(b"\\0" * n)
        free -= n
"""

SCRIPT = r"""
set -u
mount -t tmpfs -o size=96m tmpfs "$RUNS"
"$@" > "$OUT/stdout" 2> "$OUT/stderr" &
pid=$!
index="$RUNS/diskfull/trial-1/checkpoints.jsonl"
while [ ! -s "$index" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
"$PY" -c "$FILL" "$RUNS/filler" 2>> "$OUT/fill.log"
wait "$pid"; echo $? > "$OUT/rc"
rm -f "$RUNS/filler"
cp -a "$RUNS/." "$OUT/runs/"
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
        capture_output=True,
    )
    return r.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="cannot mount a private tmpfs (unshare -rm)")
def test_disk_full_during_checkpoint_write(tmp_path: Path, spider_dir: Path) -> None:
    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(
        tmp_path / "exp.yaml",
        model,
        name="diskfull",
        steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        eval_steps=MAX_STEPS,
    )
    runs = tmp_path / "mnt"
    runs.mkdir()
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    sets = [a for o in FAST_OVERRIDES for a in ("--set", o)]
    cmd = text2sql_cmd(
        "run", str(exp), "--runs-dir", str(runs), "--no-mirror", "--no-progress", *sets
    )
    env = base_env(RUNS=str(runs), OUT=str(out), PY=sys.executable, FILL=FILL)
    subprocess.run(
        ["unshare", "-rm", "bash", "-c", SCRIPT, "bash", *cmd],
        env=env,
        cwd=tmp_path,
        timeout=900,
        check=True,
    )
    stdout = (out / "stdout").read_text()
    stderr = (out / "stderr").read_text()
    rc = int((out / "rc").read_text())
    assert rc != 0, stdout[-2000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "no space left on device" in errors[0]
    assert "unexpected" not in errors[0]

    trial = ExperimentDir(out / "runs" / "diskfull").trials()[-1]
    cps = trial.checkpoints()
    assert [c["steps_completed"] for c in cps] == [SAVE_STEPS], cps
    for folder in trial.checkpoints_dir.iterdir():
        if not folder.name.startswith(".tmp-"):
            assert folder.name == cps[0]["uuid"], f"partial checkpoint {folder}"
    assert checkpoint_problems(trial.checkpoint_path(cps[0]["uuid"]), cps[0]) == []
    # Not COMPLETED, so the next run resumes it. (Often still ACTIVE: with the disk full, even
    # recording ERRORED in trial.json fails, and that is fine.)
    assert trial.info()["state"] != "COMPLETED"

    # Space again: the same command resumes from the intact checkpoint and finishes.
    again = subprocess.run(
        text2sql_cmd(
            "run",
            str(exp),
            "--runs-dir",
            str(out / "runs"),
            "--no-mirror",
            "--no-progress",
            *sets,
        ),
        env=base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"(step {SAVE_STEPS})" in again.stdout
    summary = json.loads((trial.path / "summary.json").read_text())
    assert summary["global_step"] == MAX_STEPS
