"""The experiment-config fields this project reads, checked without Determined's schemas.

Determined's own expconf JSON Schemas (`cluster.expconf`) are the full check, but they are not
installed with the project (a fresh clone has no ``../shared/determined``). Without them,
``text2sql validate`` and ``text2sql run`` still check every top-level field the trainer, the
local runner and the mirror read -- types, ranges and unknown keys -- so a typo is one clear
error here rather than a rejected submission (or a silently ignored key) later. Point
``TEXT2SQL_EXPCONF_DIR`` (or ``text2sql validate --schemas DIR``) at Determined's
``schemas/expconf/v0`` for the complete check.

`field_errors(config)` returns one line per problem, prefixed with the field's path as
Determined prints it (``<config>.searcher.metric: ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Top-level keys of a Determined 0.38 experiment config.
TOP_LEVEL_KEYS = frozenset(
    {
        "name",
        "description",
        "labels",
        "resources",
        "searcher",
        "entrypoint",
        "hyperparameters",
        "environment",
        "max_restarts",
        "checkpoint_storage",
        "checkpoint_policy",
        "min_validation_period",
        "min_checkpoint_period",
        "data",
        "bind_mounts",
        "workspace",
        "project",
        "reproducibility",
        "debug",
        "profiling",
        "scheduling_unit",
        "records_per_epoch",
        "perform_initial_validation",
        "log_policies",
        "preemption_timeout",
        "integrations",
        "optimizations",
        "internal",
    }
)
SEARCHERS = frozenset({"single", "random", "grid", "adaptive_asha", "async_halving", "custom"})
CHECKPOINT_POLICIES = frozenset({"best", "all", "none"})

Check = Callable[[Any], str | None]


def _int(minimum: int) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"expected an integer, found {type(v).__name__} {v!r}"
        return f"must be >= {minimum}, found {v}" if v < minimum else None

    return check


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, found {type(v).__name__}"


def _nonempty_str(v: Any) -> str | None:
    return _str(v) or (None if v.strip() else "must not be empty")


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, found {v!r}"


def _str_list(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"expected a list of strings, found {v!r:.60}"
    return None


def _one_of(choices: frozenset[str]) -> Check:
    def check(v: Any) -> str | None:
        if v not in choices:
            return f"unknown value {v!r}; expected one of {', '.join(sorted(choices))}"
        return None

    return check


def _entrypoint(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v.strip() else "must not be empty"
    return _str_list(v)


def _env_vars(v: Any) -> str | None:
    lists = v.values() if isinstance(v, dict) else [v]
    for items in lists:
        bad = _str_list(items)
        if bad:
            return bad
        for item in items:
            if "=" not in item:
                return f"expected NAME=value entries, found {item!r}"
    return None


def _max_length(v: Any) -> str | None:
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in ("batches", "records", "epochs"):
            return f"expected {{batches|records|epochs: N}}, found {v!r}"
        return _int(1)(next(iter(v.values())))
    return _int(1)(v)


# path -> check; a mapping's unknown keys are left to Determined's schemas (many exist).
FIELDS: dict[str, Check] = {
    "name": _nonempty_str,
    "description": _str,
    "labels": _str_list,
    "entrypoint": _entrypoint,
    "max_restarts": _int(0),
    "resources.slots_per_trial": _int(0),
    "resources.resource_pool": _nonempty_str,
    "resources.max_slots": _int(0),
    "searcher.name": _one_of(SEARCHERS),
    "searcher.metric": _nonempty_str,
    "searcher.smaller_is_better": _bool,
    "searcher.max_trials": _int(1),
    "searcher.max_concurrent_trials": _int(0),
    "searcher.max_time": _int(1),
    "searcher.time_metric": _nonempty_str,
    "searcher.max_length": _max_length,
    "checkpoint_storage.save_trial_best": _int(0),
    "checkpoint_storage.save_trial_latest": _int(0),
    "checkpoint_storage.save_experiment_best": _int(0),
    "checkpoint_policy": _one_of(CHECKPOINT_POLICIES),
    "environment.environment_variables": _env_vars,
}
MAPPINGS = ("resources", "searcher", "checkpoint_storage", "environment", "hyperparameters")
REQUIRED = ("entrypoint", "hyperparameters", "searcher.metric")


def _lookup(config: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def field_errors(config: dict[str, Any]) -> list[str]:
    """One line per problem with the fields this project reads (empty: all fine)."""
    errors = []
    unknown = sorted(k for k in config if k not in TOP_LEVEL_KEYS)
    if unknown:
        errors.append(
            f"<config>: unknown key(s) {', '.join(repr(k) for k in unknown)}; Determined "
            f"accepts {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    for key in MAPPINGS:
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            errors.append(f"<config>.{key}: expected a mapping, found {type(config[key]).__name__}")
    for path in REQUIRED:
        found, value = _lookup(config, path)
        if not found or value is None:
            errors.append(f"<config>.{path}: required")
    for path, check in FIELDS.items():
        found, value = _lookup(config, path)
        if found and value is not None:
            problem = check(value)
            if problem:
                errors.append(f"<config>.{path}: {problem}")
    return errors
