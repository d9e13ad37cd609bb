"""Shared pieces of the fault-injection suite: run ``text2sql`` as a real subprocess, watch
its output line by line (to kill it at a chosen moment), and check run-store checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOOKS_DIR = Path(__file__).resolve().parent / "hooks"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Evaluate only at the end, on loss (no generation), so steps and checkpoints dominate.
FAST_OVERRIDES = [
    "data.number_of_samples=40",
    "eval.generation_samples=0",
    "searcher.metric=eval_loss",
    "searcher.smaller_is_better=true",
    "training_args.per_device_train_batch_size=2",
]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("TEXT2SQL_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    # One thread: the tiny model gains nothing from more, and spinning OpenMP threads crawl on a
    # shared, busy machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS_DIR), str(REPO_ROOT)])
    env.update(extra)
    return env


def text2sql_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


class Watched:
    """A subprocess (own session, so kill -9 reaches all of it) whose merged output is
    collected line by line with arrival times."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[str], bool], count: int = 1, timeout: float = 1800) -> bool:
        """True once ``count`` lines matched ``pred``; False if the process ended first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if sum(1 for line in self.lines if pred(line)) >= count:
                    return True
                if self._done:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {count} matching lines in {timeout} s:\n{self.text}")
                self._cond.wait(min(left, 1.0))

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)

    def wait(self, timeout: float = 1800) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


def checkpoint_problems(folder: Path, index_entry: dict | None = None) -> list[str]:
    """Why ``folder`` is not a complete, loadable run-store checkpoint ([] when it is).

    Loads what a resume loads: metadata, trainer state, the weights (safetensors), optimizer
    and scheduler (``torch.load(weights_only=True)``), and checks file sizes against the index.
    """
    import torch
    from safetensors.torch import load_file

    problems = []
    try:
        meta = json.loads((folder / "metadata.json").read_text())
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["global_step"] != meta["steps_completed"]:
            problems.append(f"trainer_state step {state['global_step']} != metadata")
        weights = [p for p in folder.glob("*.safetensors")]
        if not weights:
            problems.append("no *.safetensors weights")
        for w in weights:
            load_file(str(w))
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.load(folder / name, weights_only=True, map_location="cpu")
        json.loads((folder / "text2sql.json").read_text())
        json.loads((folder / "tokenizer.json").read_text())
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"{type(e).__name__}: {e}")
    if index_entry is not None:
        for rel, size in (index_entry.get("resources") or {}).items():
            f = folder / rel
            if not f.is_file() or f.stat().st_size != size:
                problems.append(f"{rel}: size differs from the index ({size})")
    return problems
