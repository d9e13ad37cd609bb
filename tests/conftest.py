"""Shared pytest fixtures.

Real public data lives in ``../shared`` beside the checkout (never copied into the repo).
When it is absent, tests that need it are skipped with a reason -- except under ``CI=true``,
where a missing ``../shared`` is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not found at {path} (expected ../shared beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true, so this is a failure, not a skip")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED, "shared reference data")


@pytest.fixture(scope="session")
def spider_dir() -> Path:
    return _require(SHARED / "data" / "spider_dev", "Spider dev sample")


@pytest.fixture(scope="session")
def spider_full_dir() -> Path:
    """Spider train + dev in the release layout (``train_spider.jsonl``, ``dev.jsonl``, ...)."""
    return _require(SHARED / "data" / "spider", "Spider train + dev")


@pytest.fixture(scope="session")
def sql_create_context_path() -> Path:
    return _require(SHARED / "data" / "sql-create-context" / "sample.jsonl", "sql-create-context")


@pytest.fixture(scope="session")
def determined_ref_dir() -> Path:
    return _require(SHARED / "determined", "Determined reference data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip without CUDA; `cluster` tests skip without a Determined master."""
    import importlib.util

    has_gpu = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_gpu = torch.cuda.is_available()
    has_master = bool(os.environ.get("DET_MASTER"))
    for item in items:
        # Markers, not keywords: a keyword also matches a directory name (tests/cluster/).
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible)"))
        if item.get_closest_marker("cluster") and not has_master:
            item.add_marker(pytest.mark.skip(reason="needs a Determined master (set DET_MASTER)"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Write the gretel parquet fixture from its hand-written rows (no binary in git)."""
    import importlib.util

    target = REPO_ROOT / "tests" / "fixtures" / "gretel_sample.parquet"
    if target.exists():
        return
    spec = importlib.util.spec_from_file_location(
        "make_gretel_sample", REPO_ROOT / "tests" / "fixtures" / "make_gretel_sample.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


_FP32_PRECISION = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn")


def _backend(path: str) -> Any:
    import torch

    obj: Any = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


@pytest.fixture(autouse=True)
def _fp32_precision_restored() -> Any:
    """`TrainingArguments(tf32=True)` switches torch's process-wide fp32 matmul precision to
    TF32 (as a training process should); a later test comparing fp32 results to 1e-5 on a GPU
    would then see TF32's ~1e-4 rounding. Each test starts with the precision it found."""
    import sys

    if "torch" not in sys.modules:
        yield
        return
    saved = {p: _backend(p).fp32_precision for p in _FP32_PRECISION}
    yield
    for path, value in saved.items():  # the process-wide setting first: it cascades down
        if _backend(path).fp32_precision != value:
            _backend(path).fp32_precision = value


@pytest.fixture(autouse=True)
def _no_process_group_left_behind() -> Any:
    """Tests that run a trial in-process (the real ``det.core.init`` / Trainer under launcher
    environment variables) leave torch's default process group initialized, as a trial process
    would at exit; a later in-process test that builds its own group would then fail with
    "trying to initialize the default process group twice". Each test starts without one, as
    each trial starts in a fresh process."""
    yield
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
