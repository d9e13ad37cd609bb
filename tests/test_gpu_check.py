"""benchmarks/gpu_check.py --dry-run: the prepared GPU check runs here without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {r["check"]: r for r in report["results"]}
    # The models the memory check would build have exactly the modelled parameter counts.
    for name in ("full-bf16", "lora-r16-bf16"):
        counts = checks[f"parameter count {name}"]
        assert counts["ok"] and counts["built"] == counts["modelled"]
    # Every gpu-marked test is collected (none run here).
    collected = checks["pytest -m gpu (collected, not run)"]["tests"]
    assert any("test_liger" in t for t in collected)
    assert any("test_prefix_sharing" in t for t in collected)
    assert any("test_precision" in t for t in collected)
