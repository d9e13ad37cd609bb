"""``text2sql validate`` on a fresh clone (no ``../shared/determined``): the project's own
checks of every experiment-config field it reads, and a notice saying where Determined's full
schemas can be pointed to. Plus ``text2sql --version``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.expconf_fields import field_errors
from tests.conftest import REPO_ROOT
from tests.test_readme_commands import copy_repo

MAIN = yaml.safe_load((REPO_ROOT / "experiments" / "smollm2-135m-lora-cpu.yaml").read_text())


def test_every_experiment_passes_the_field_checks() -> None:
    for path in sorted((REPO_ROOT / "experiments").glob("*.yaml")):
        assert field_errors(yaml.safe_load(path.read_text())) == [], path.name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"searcher": {"smaller_is_better": "no"}}, "searcher.smaller_is_better: expected true"),
        ({"searcher": {"name": "bayesian"}}, "searcher.name: unknown value 'bayesian'"),
        ({"resources": {"slots_per_trial": -1}}, "resources.slots_per_trial: must be >= 0"),
        ({"resources": {"slots_per_trial": "2"}}, "expected an integer, found str '2'"),
        ({"max_restarts": 1.5}, "max_restarts: expected an integer"),
        ({"checkpoint_storage": {"save_trial_best": True}}, "save_trial_best: expected an integer"),
        ({"environment": {"environment_variables": ["HF_HUB_OFFLINE"]}}, "NAME=value"),
        ({"labels": "cpu"}, "labels: expected a list of strings"),
        ({"resourcse": {}}, "unknown key(s) 'resourcse'"),
        ({"searcher": {"metric": None}}, "searcher.metric: required"),
        ({"entrypoint": ""}, "entrypoint: must not be empty"),
        ({"searcher": {"max_length": {"steps": 5}}}, "expected {batches|records|epochs: N}"),
        ({"resources": ["slots"]}, "resources: expected a mapping, found list"),
    ],
)
def test_field_checks_name_the_field_and_the_problem(change: dict, message: str) -> None:
    config = copy.deepcopy(MAIN)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    errors = field_errors(config)
    assert any(message in e for e in errors), errors


def _cli(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TEXT2SQL_EXPCONF_DIR"}
    env["PYTHONPATH"] = str(clone)
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_validate_in_a_fresh_clone_without_determineds_schemas(tmp_path: Path) -> None:
    clone = copy_repo(tmp_path / "clone" / "text2sql-finetune")
    yamls = sorted(str(p.relative_to(clone)) for p in (clone / "experiments").glob("*.yaml"))
    broken = clone / "broken.yaml"
    cfg = copy.deepcopy(MAIN)
    cfg["searcher"]["smaller_is_better"] = "no"
    cfg["max_restarts"] = -1
    broken.write_text(yaml.safe_dump(cfg))

    ok = _cli(clone, "validate", *yamls)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("note: Determined's expconf schemas are not at ")
    assert "--schemas" in lines[0] and "TEXT2SQL_EXPCONF_DIR" in lines[0]
    assert [ln.split(" (")[0] for ln in lines[1:]] == [f"ok: {y}" for y in yamls]
    assert all(ln.endswith("project field checks)") for ln in lines[1:])

    bad = _cli(clone, "validate", "broken.yaml")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    error = bad.stderr.strip().splitlines()[-1]
    assert error.startswith("error: broken.yaml: not a valid experiment config: ")
    assert "max_restarts: must be >= 0" in error and "smaller_is_better" in error

    missing = _cli(clone, "validate", "--schemas", str(tmp_path / "nowhere"), yamls[0])
    assert missing.returncode == 2
    assert "expconf schemas not found" in missing.stderr.strip().splitlines()[-1]

    version = _cli(clone, "--version")
    assert version.returncode == 0 and version.stdout.startswith("text2sql ")


def test_training_args_values_are_checked_against_their_field_types() -> None:
    """Each training_args value fits its TrainingArguments field's type, or one UserError names
    the key (the dataclass itself accepts `learning_rate: "fast"`; the optimizer fails later).
    Numbers YAML reads as strings (`1e-4`, no dot) become numbers."""
    from dataset_utils.errors import UserError
    from trainer.config import validate_training_args

    args = validate_training_args(
        {"learning_rate": "1e-4", "save_steps": 50, "report_to": ["none"], "eval_steps": None}
    )
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.save_steps == 50
    for bad, message in [
        ({"learning_rate": "fast"}, "learning_rate: expected a number, found 'fast'"),
        ({"max_steps": 2.5}, "max_steps: expected an integer, found 2.5"),
        ({"bf16": "yes"}, "bf16: expected true or false, found 'yes'"),
        ({"seed": None}, "seed: expected an integer, found None"),
        ({"report_to": 3}, "report_to: expected null or a string or a list, found 3"),
        ({"lr_scheduler_type": 5}, "lr_scheduler_type: expected one of 'linear', 'cosine'"),
    ]:
        with pytest.raises(UserError) as e:
            validate_training_args(bad)
        assert f"hyperparameters.training_args.{message}" in str(e.value)
