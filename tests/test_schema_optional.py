"""Without Determined's expconf schemas, `run` warns and goes on; `validate` refuses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dataset_utils.errors import UserError
from tests.conftest import REPO_ROOT

MAIN_JOB = REPO_ROOT / "experiments" / "smollm2-135m-lora-cpu.yaml"


def test_run_path_skips_the_schema_check_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer.experiment import load_experiment

    monkeypatch.setenv("TEXT2SQL_EXPCONF_DIR", str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING):
        exp = load_experiment(MAIN_JOB)
    assert exp.hparams.method == "lora"
    assert "skipping the schema check" in caplog.text
    assert "TEXT2SQL_EXPCONF_DIR" in caplog.text


def test_validate_requires_the_schemas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.experiment import load_experiment

    monkeypatch.setenv("TEXT2SQL_EXPCONF_DIR", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="expconf schemas not found"):
        load_experiment(MAIN_JOB, schema_required=True)
