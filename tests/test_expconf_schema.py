"""Tests for cluster.expconf: Determined's own schema test cases, plus our pre-submit check.

Every case in ``../shared/determined/schema-test-cases-v0/*.yaml`` (Determined 0.38.1's
cross-language cases) is one test. A case may say ``sane_as`` / ``complete_as`` (must pass
that phase against each listed schema) and ``sanity_errors`` / ``completeness_errors`` (must
fail that phase, with every listed regex found in some error line), as Determined's own
``harness/tests/common/test_schemas.py`` runs them. Cases that only exercise Go/Python
defaulting or merging (``default_as`` / ``merge_as``, no validation outcome) are checked for
the one thing they imply about validation: their input configs are sane against that schema.
"""

from __future__ import annotations

import functools
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import expconf
from dataset_utils.errors import UserError

CASES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "determined"
CASES_DIR = CASES_DIR / "schema-test-cases-v0"
MISSING = "schema-test-cases-v0 not found"


@functools.cache
def _cases(directory: Path) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")):
            cases[f"{path.name}::{case['name']}"] = case
    return cases


def _case_ids() -> list[str]:
    # Parametrize at collection time; without ../shared a single id stands in, and the
    # determined_ref_dir fixture then skips it (or fails it under CI=true).
    return list(_cases(CASES_DIR)) if CASES_DIR.is_dir() else [MISSING]


@pytest.fixture(scope="module")
def validator(determined_ref_dir: Path) -> expconf.ExpconfValidator:
    return expconf.ExpconfValidator(expconf.load_schemas(determined_ref_dir / "expconf-v0"))


def _assert_errors_match(errors: list[str], expected: list[str], what: str) -> None:
    assert errors, f"{what}: validated unexpectedly, expected errors matching {expected}"
    for pattern in expected:
        assert any(re.search(pattern, line) for line in errors), (
            f"{what}: no error matches {pattern!r}; got:\n  " + "\n  ".join(errors)
        )


@pytest.mark.parametrize("case_id", _case_ids())
def test_determined_schema_case(
    case_id: str, determined_ref_dir: Path, validator: expconf.ExpconfValidator
) -> None:
    case = _cases(determined_ref_dir / "schema-test-cases-v0")[case_id]
    config = case["case"]
    checked = False
    for url in case.get("sane_as") or []:
        assert validator.sanity_errors(config, url) == [], f"sanity against {url}"
        checked = True
    for url in case.get("complete_as") or []:
        assert validator.completeness_errors(config, url) == [], f"completeness against {url}"
        checked = True
    for url, expected in (case.get("sanity_errors") or {}).items():
        _assert_errors_match(validator.sanity_errors(config, url), expected, f"sanity {url}")
        checked = True
    for url, expected in (case.get("completeness_errors") or {}).items():
        errors = validator.completeness_errors(config, url)
        _assert_errors_match(errors, expected, f"completeness {url}")
        checked = True
    if checked:
        return
    # A defaulting / merging case: its inputs must at least pass the sanity check.
    url = case.get("default_as") or case.get("merge_as")
    assert url, f"case {case_id} states nothing this test understands"
    for key in ("case", "merge_src"):
        if key in case:
            assert validator.sanity_errors(case[key], url) == [], f"{key} sane against {url}"


def test_every_case_is_collected(determined_ref_dir: Path) -> None:
    # Guards the parametrization above against silently collecting nothing.
    assert len(_cases(determined_ref_dir / "schema-test-cases-v0")) >= 150


# ---------------------------------------------------------------------------------------------
# Hand-written experiment configs, through validate_experiment
# ---------------------------------------------------------------------------------------------

MINIMAL_EXPERIMENT = textwrap.dedent(
    """\
    name: text2sql-lora
    entrypoint: python3 -m trainer.det_entry
    searcher:
      name: single
      metric: eval_loss
      smaller_is_better: true
    resources:
      slots_per_trial: 1
    hyperparameters:
      learning_rate: 0.0002
      lora_r:
        type: const
        val: 16
    """
)


def _minimal() -> dict[str, Any]:
    return yaml.safe_load(MINIMAL_EXPERIMENT)


def _validate(validator: expconf.ExpconfValidator, config: Any) -> list[str]:
    return expconf.validate_experiment(config, validator=validator)


def test_minimal_single_searcher_experiment_passes(validator: expconf.ExpconfValidator) -> None:
    assert _validate(validator, _minimal()) == []
    # As written it is sane but not complete: the master fills in checkpoint storage etc.
    assert validator.sanity_errors(_minimal()) == []
    assert "<config>: checkpoint_storage is a required property" in (
        validator.completeness_errors(_minimal())
    )


def test_unknown_top_level_key_is_named(validator: expconf.ExpconfValidator) -> None:
    config = _minimal() | {"max_step": 100}
    errors = _validate(validator, config)
    assert errors == ["<config>: Additional properties are not allowed ('max_step' was unexpected)"]


def test_negative_slots_per_trial_fails(validator: expconf.ExpconfValidator) -> None:
    config = _minimal()
    config["resources"]["slots_per_trial"] = -1
    errors = _validate(validator, config)
    assert errors == ["<config>.resources.slots_per_trial: -1 is less than the minimum of 0"]


def test_wrong_searcher_name_fails(validator: expconf.ExpconfValidator) -> None:
    config = _minimal()
    config["searcher"]["name"] = "bayesian"
    errors = _validate(validator, config)
    assert len(errors) == 1
    assert errors[0].startswith("<config>.searcher: ")
    assert "one of 'single', 'random', 'grid'" in errors[0]


def test_misspelled_and_ill_typed_searcher_keys_name_their_path(
    validator: expconf.ExpconfValidator,
) -> None:
    config = _minimal()
    config["searcher"]["metric"] = 5
    assert _validate(validator, config) == [
        "<config>.searcher.metric: 5 is not of type 'string', 'null'"
    ]
    config["searcher"] = {"name": "single", "metrc": "eval_loss"}
    assert _validate(validator, config) == [
        "<config>.searcher: Additional properties are not allowed ('metrc' was unexpected)",
        "<config>.searcher: metric is a required property",
    ]


def test_searcher_is_never_filled_in(validator: expconf.ExpconfValidator) -> None:
    config = _minimal()
    del config["searcher"]
    assert _validate(validator, config) == ["<config>: searcher is a required property"]


def test_master_side_checks(validator: expconf.ExpconfValidator) -> None:
    config = _minimal()
    del config["entrypoint"]
    assert _validate(validator, config) == [
        "<config>: entrypoint is a required property (managed experiments)"
    ]
    config = _minimal()
    config["searcher"] = {"name": "adaptive_asha", "metric": "eval_loss", "max_trials": 4}
    (error,) = _validate(validator, config)
    assert error.startswith("<config>.searcher: the 'adaptive_asha' searcher requires max_time")
    config["searcher"] |= {"max_time": 1000, "time_metric": "batches"}
    assert _validate(validator, config) == []
    config["searcher"] = {"name": "custom", "metric": "eval_loss"}
    assert _validate(validator, config) == [
        "<config>.searcher.name: the 'custom' searcher has been removed and is not valid for "
        "new experiments"
    ]


def test_user_checkpoint_storage_must_be_complete(validator: expconf.ExpconfValidator) -> None:
    config = _minimal() | {"checkpoint_storage": {"type": "s3", "prefix": "runs"}}
    assert _validate(validator, config) == [
        "<config>.checkpoint_storage: bucket is a required property"
    ]
    # Without a type it only adjusts the cluster's storage, which the master merges in.
    config["checkpoint_storage"] = {"save_trial_best": 3}
    assert _validate(validator, config) == []
    config["checkpoint_storage"] = {"type": "s3", "bucket": "b", "prefix": "../up"}
    assert _validate(validator, config) == [
        "<config>.checkpoint_storage.prefix: prefix cannot contain /../"
    ]


def test_eventually_required_treats_null_as_missing(validator: expconf.ExpconfValidator) -> None:
    # The master treats an explicit null like an absent key; only completeness enforces it.
    config = {"type": "s3", "bucket": None}
    assert validator.sanity_errors(config, "s3") == []
    assert validator.completeness_errors(config, "s3") == [
        "<config>: bucket is a required property"
    ]


def test_fill_master_defaults_leaves_input_alone() -> None:
    config = {"environment": {"image": {"cuda": "mine"}}, "searcher": {"name": "single"}}
    filled = expconf.fill_master_defaults(config)
    assert config == {"environment": {"image": {"cuda": "mine"}}, "searcher": {"name": "single"}}
    assert filled["environment"]["image"]["cuda"] == "mine"
    assert set(filled["environment"]["image"]) == {"cpu", "cuda", "rocm"}
    assert filled["searcher"] == {"name": "single"}


def test_non_object_config_is_reported(validator: expconf.ExpconfValidator) -> None:
    assert _validate(validator, ["not", "a", "mapping"]) == [
        "<config>: ['not', 'a', 'mapping'] is not of type 'object'"
    ]


def test_schema_names_may_be_short(validator: expconf.ExpconfValidator) -> None:
    assert validator.sanity_errors({"batches": 1}, "length") == []
    with pytest.raises(ValueError, match="unknown expconf schema"):
        validator.sanity_errors({}, "no-such-schema")


def test_missing_schema_dir_is_a_user_error(tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(UserError, match="expconf schemas not found"):
        expconf.load_schemas(tmp_path / "absent")
    monkeypatch.setenv(expconf.ENV_SCHEMA_DIR, str(tmp_path / "absent-too"))
    assert expconf.default_schema_dir() == tmp_path / "absent-too"
    with pytest.raises(UserError, match="TEXT2SQL_EXPCONF_DIR"):
        expconf.load_schemas()
    with pytest.raises(UserError, match="no expconf schemas"):
        expconf.load_schemas(tmp_path)
