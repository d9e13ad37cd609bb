"""Validate Determined experiment configs locally, against Determined's own JSON Schemas.

A Determined master validates every ``det e create`` against the ``expconf/v0`` JSON Schemas
(kept, from Determined 0.38.1, in ``../shared/determined/expconf-v0``). Checking a config here
first turns a round trip to the cluster into an immediate, one-line-per-problem report.

The schemas are draft-07 plus seven custom keywords, implemented below as ``jsonschema``
keyword validators the way Determined's Go master implements them
(``master/pkg/schemas/extensions/``):

- ``union``: like ``oneOf``, but reports the errors of the one branch the instance was "meant"
  to match (chosen by each branch's ``unionKey``), else the union's ``defaultMessage``.
- ``optionalRef``: ``$ref`` that also accepts ``null``.
- ``checks``: ``{message: subschema}``; reports ``message`` when the subschema fails.
- ``compareProperties``: ``a<b``, ``a<=b`` and ``a_is_subdir_of_b`` between two properties.
- ``disallowProperties``: ``{property: message}``; reports ``message`` when it is present.
- ``eventuallyRequired``: ``required``, but only in the *completeness* phase; like the master,
  a property whose value is ``null`` counts as missing.
- ``eventually``: a subschema enforced only in the completeness phase.

Validation has two phases, as in the master (``schemas/README.md`` upstream): the *sanity*
check runs on the config exactly as the user wrote it (everything present must be well-formed),
the *completeness* check runs after the master has filled in cluster and schema defaults (every
``eventuallyRequired`` field must then be present). `sanity_errors` and `completeness_errors`
are those two checks; `validate_experiment` is what our tooling runs before submitting, and
reproduces the master's ``parseCreateExperiment`` pipeline (see its docstring for exactly which
defaults are stood in for).

Every error is one line, prefixed with the JSON path of the offending value the way Determined
prints it: ``<config>`` is the document root, so ``<config>.searcher.metric: ...`` or
``<config>.hyperparameters.list_hparam[2]: ...``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, ValidationError, validators
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from dataset_utils import settings
from dataset_utils.errors import UserError

SCHEMA_URL_PREFIX = "http://determined.ai/schemas/expconf/v0/"
EXPERIMENT_SCHEMA = SCHEMA_URL_PREFIX + "experiment.json"
ENV_SCHEMA_DIR = "TEXT2SQL_EXPCONF_DIR"

# Stand-ins for values a master fills in at submission time and that the schemas mark
# `eventuallyRequired`. They only need to satisfy the schemas; they are never submitted.
PLACEHOLDER_NAME = "<named by the master>"
PLACEHOLDER_SEED = 0
PLACEHOLDER_IMAGE = "<task container default image>"
PLACEHOLDER_CHECKPOINT_STORAGE: dict[str, Any] = {
    "type": "shared_fs",
    "host_path": "/<cluster checkpoint storage>",
}
IMAGE_FLAVORS = ("cpu", "cuda", "rocm")

# Searchers the master still parses (so the schemas accept them) but refuses to run
# (`SearcherConfig.AssertCurrent` upstream).
REMOVED_SEARCHERS = ("sync_halving", "adaptive", "adaptive_simple", "custom")
SEARCHERS_NEEDING_TIME = ("adaptive_asha", "async_halving")

JSON = Any
KeywordFn = Callable[[Any, Any, Any, dict[str, Any]], Iterator[ValidationError]]


# ---------------------------------------------------------------------------------------------
# Loading the schemas
# ---------------------------------------------------------------------------------------------


def default_schema_dir() -> Path:
    """``$TEXT2SQL_EXPCONF_DIR``, else ``shared/determined/expconf-v0`` beside the checkout."""
    env = os.environ.get(ENV_SCHEMA_DIR)
    if env:
        return Path(env).expanduser()
    return settings.REPO_ROOT.parent / "shared" / "determined" / "expconf-v0"


def load_schemas(schema_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Load every expconf schema in ``schema_dir`` (default: `default_schema_dir`), by ``$id``.

    Raises `UserError` when the directory is missing, holds no schema, or holds a file that is
    not a JSON Schema with an ``$id``.
    """
    directory = Path(schema_dir) if schema_dir is not None else default_schema_dir()
    if not directory.is_dir():
        raise UserError(
            f"Determined expconf schemas not found: expected a directory of *.json schemas at "
            f"{directory}. Put Determined's schemas/expconf/v0 there (../shared/determined/"
            f"expconf-v0 beside the checkout) or set {ENV_SCHEMA_DIR} to their directory."
        )
    schemas: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read expconf schema {path}: {exc}") from exc
        schema_id = schema.get("$id") if isinstance(schema, dict) else None
        if not isinstance(schema_id, str):
            raise UserError(
                f"{path} is not an expconf JSON Schema: expected an object with a string "
                f"'$id', found a {type(schema).__name__} with $id={schema_id!r}"
            )
        schemas[schema_id] = schema
    if not schemas:
        raise UserError(
            f"no expconf schemas (*.json) found in {directory}; point {ENV_SCHEMA_DIR} at "
            f"Determined's schemas/expconf/v0 directory"
        )
    return schemas


# ---------------------------------------------------------------------------------------------
# The custom keywords
# ---------------------------------------------------------------------------------------------


def _is_object(value: JSON) -> bool:
    return isinstance(value, dict)


def _is_number(value: JSON) -> bool:
    # JSON booleans are not numbers, but Python's bool is an int subclass.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _union_key_matches(key: str, instance: JSON) -> bool:
    """Whether a union branch's ``unionKey`` says the instance was meant to be that branch."""
    if key == "always":
        return True
    if key == "never":
        return False
    kind, _, arg = key.partition(":")
    if kind == "not":
        return not _union_key_matches(arg, instance)
    if kind == "const":
        name, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"invalid unionKey {key!r}")
        # As in the master, only a property equal to that string selects the branch.
        return _is_object(instance) and instance.get(name) == value
    if kind == "singleproperty":
        return _is_object(instance) and len(instance) == 1 and arg in instance
    if kind == "type" and arg in ("array", "object"):
        return isinstance(instance, list) if arg == "array" else _is_object(instance)
    if kind == "hasattr":
        return _is_object(instance) and arg in instance
    raise ValueError(f"invalid unionKey {key!r}")


def _union(validator: Any, union: dict[str, Any], instance: JSON, schema: dict) -> Iterator:
    # oneOf semantics; the errors shown are those of the first failing branch whose unionKey
    # matches, because oneOf's own "not valid under any" message never says what is wrong.
    selected: list[ValidationError] | None = None
    valid = 0
    for index, item in enumerate(union["items"]):
        errors = list(validator.descend(instance, item, schema_path=index))
        if not errors:
            valid += 1
        elif selected is None and _union_key_matches(item.get("unionKey", "never"), instance):
            selected = errors
    if valid == 1:
        return
    if valid > 1:
        yield ValidationError("matches more than one alternative of a union (schema bug)")
    elif selected:
        yield from selected
    else:
        yield ValidationError(union.get("defaultMessage", "union failed to validate"))


def _optional_ref(validator: Any, ref: str, instance: JSON, schema: dict) -> Iterator:
    if instance is None:
        return
    yield from validator.descend(instance, {"$ref": ref}, schema_path="optionalRef")


def _checks(validator: Any, checks: dict[str, Any], instance: JSON, schema: dict) -> Iterator:
    for message, subschema in checks.items():
        if next(validator.descend(instance, subschema), None) is not None:
            yield ValidationError(message)


def _property_by_path(instance: JSON, dotted: str) -> JSON:
    for key in dotted.split("."):
        if not _is_object(instance):
            return None
        instance = instance.get(key)
    return instance


def _is_subdir(a: str, b: str) -> bool:
    a_norm, b_norm = posixpath.normpath(a), posixpath.normpath(b)
    if posixpath.isabs(a_norm):
        # The master compares cleaned paths by string prefix (so /tmpx counts as inside /tmp);
        # mirror it exactly, since the point is to predict what the master accepts.
        return a_norm.startswith(b_norm)
    return not a_norm.startswith("..")


def _compare_properties(validator: Any, compare: dict, instance: JSON, schema: dict) -> Iterator:
    if not _is_object(instance):
        return
    a_name, b_name, kind = compare["a"], compare["b"], compare["type"]
    a, b = _property_by_path(instance, a_name), _property_by_path(instance, b_name)
    # Missing or ill-typed values are reported by the ordinary keywords; comparing them here
    # would only add a second, less helpful error.
    if kind in ("a<b", "a<=b"):
        if not (_is_number(a) and _is_number(b)):
            return
        if a > b or (kind == "a<b" and a == b):
            # The master words both comparisons "less than".
            yield ValidationError(f"{a_name} must be less than {b_name}")
    elif kind == "a_is_subdir_of_b":
        if isinstance(a, str) and isinstance(b, str) and not _is_subdir(a, b):
            yield ValidationError(f"{a_name} must be a subdirectory of {b_name}")
    else:
        raise ValueError(f"unrecognized compareProperties type {kind!r}")


def _disallow_properties(
    validator: Any, disallowed: dict[str, str], instance: JSON, schema: dict
) -> Iterator:
    if not _is_object(instance):
        return
    for prop in instance:
        if prop in disallowed:
            # Reported at the object, as the master does; the message names the property.
            yield ValidationError(disallowed[prop])


def _eventually_required(
    validator: Any, required: list[str], instance: JSON, schema: dict
) -> Iterator:
    if not _is_object(instance):
        return
    for prop in required:
        # The master treats an explicit null as "not provided".
        if instance.get(prop) is None:
            yield ValidationError(f"{prop} is a required property")


def _eventually(validator: Any, subschema: dict, instance: JSON, schema: dict) -> Iterator:
    yield from validator.descend(instance, subschema, schema_path="eventually")


SANITY_KEYWORDS: dict[str, KeywordFn] = {
    "union": _union,
    "optionalRef": _optional_ref,
    "checks": _checks,
    "compareProperties": _compare_properties,
    "disallowProperties": _disallow_properties,
}
# The completeness validator is the sanity validator plus the two "eventually" keywords; the
# sanity validator simply does not know them, so jsonschema ignores them there.
COMPLETENESS_KEYWORDS: dict[str, KeywordFn] = {
    **SANITY_KEYWORDS,
    "eventuallyRequired": _eventually_required,
    "eventually": _eventually,
}

_SanityValidator = validators.extend(Draft7Validator, SANITY_KEYWORDS)
_CompletenessValidator = validators.extend(Draft7Validator, COMPLETENESS_KEYWORDS)


# ---------------------------------------------------------------------------------------------
# Error formatting
# ---------------------------------------------------------------------------------------------


def format_path(path: Iterable[str | int]) -> str:
    """``<config>.a.b[2]`` for the JSON path ``a / b / 2``."""
    out = "<config>"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _format_errors(errors: Iterable[ValidationError]) -> list[str]:
    lines = {
        f"{format_path(error.absolute_path)}: {' '.join(error.message.split())}" for error in errors
    }
    return sorted(lines)


# ---------------------------------------------------------------------------------------------
# The validator
# ---------------------------------------------------------------------------------------------


class ExpconfValidator:
    """Sanity and completeness validation against one set of expconf schemas."""

    def __init__(self, schemas: Mapping[str, dict[str, Any]]) -> None:
        self.schemas = dict(schemas)
        # jsonschema picks the validator class for every schema it descends into from that
        # schema's "$schema"; each file says draft-07, which would silently swap our extended
        # class for plain Draft7Validator (dropping the custom keywords) behind every $ref.
        # Without "$schema" the current (extended) class is kept.
        self._compiled = {
            schema_id: {key: value for key, value in schema.items() if key != "$schema"}
            for schema_id, schema in self.schemas.items()
        }
        # $refs between the files are absolute $id URLs; resolve them from memory, never the
        # network.
        self._registry: Registry = Registry().with_resources(
            (schema_id, Resource.from_contents(schema, default_specification=DRAFT7))
            for schema_id, schema in self._compiled.items()
        )
        self._cache: dict[tuple[str, bool], Validator] = {}

    def schema_url(self, schema_name: str) -> str:
        """Accept a full ``$id`` or a short name (``"searcher"``, ``"searcher.json"``)."""
        if schema_name in self.schemas:
            return schema_name
        short = schema_name if schema_name.endswith(".json") else schema_name + ".json"
        url = SCHEMA_URL_PREFIX + short
        if url in self.schemas:
            return url
        raise ValueError(f"unknown expconf schema {schema_name!r}")

    def _validator(self, schema_name: str, complete: bool) -> Validator:
        url = self.schema_url(schema_name)
        key = (url, complete)
        if key not in self._cache:
            cls = _CompletenessValidator if complete else _SanityValidator
            self._cache[key] = cls(self._compiled[url], registry=self._registry)
        return self._cache[key]

    def sanity_errors(self, config: JSON, schema_name: str = EXPERIMENT_SCHEMA) -> list[str]:
        """Errors in ``config`` as the user wrote it (everything present must be well-formed)."""
        return _format_errors(self._validator(schema_name, False).iter_errors(config))

    def completeness_errors(self, config: JSON, schema_name: str = EXPERIMENT_SCHEMA) -> list[str]:
        """Sanity errors plus every missing ``eventuallyRequired`` / failing ``eventually``."""
        return _format_errors(self._validator(schema_name, True).iter_errors(config))


@functools.lru_cache(maxsize=4)
def _validator_for(directory: str) -> ExpconfValidator:
    return ExpconfValidator(load_schemas(Path(directory)))


def get_validator(schema_dir: Path | None = None) -> ExpconfValidator:
    """The (cached) validator for ``schema_dir`` (default: `default_schema_dir`)."""
    directory = Path(schema_dir) if schema_dir is not None else default_schema_dir()
    return _validator_for(str(directory.resolve()))


def sanity_errors(config: JSON, schema_name: str = EXPERIMENT_SCHEMA) -> list[str]:
    """Sanity errors of ``config`` against ``schema_name``, with the default schemas."""
    return get_validator().sanity_errors(config, schema_name)


def completeness_errors(config: JSON, schema_name: str = EXPERIMENT_SCHEMA) -> list[str]:
    """Completeness errors of ``config`` against ``schema_name``, with the default schemas."""
    return get_validator().completeness_errors(config, schema_name)


# ---------------------------------------------------------------------------------------------
# What our tooling runs before submitting
# ---------------------------------------------------------------------------------------------


def fill_master_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with stand-ins for what a master fills in at submission.

    Only ``eventuallyRequired`` fields that a user normally leaves to the master are filled;
    everything else is left exactly as written, so the completeness check still catches what
    the master would reject:

    - ``checkpoint_storage``: the master merges in the cluster's storage. When the config has
      none, or one without ``type`` (a partial config that only adjusts e.g. ``save_trial_best``),
      a complete shared_fs stand-in is used. A storage *with* a ``type`` is kept as written and
      must be complete on its own (an ``s3`` one needs its ``bucket``): the cluster's storage only
      completes it when it has the same type, which cannot be known from here.
    - ``name``: generated by the master when missing.
    - ``hyperparameters``, ``reproducibility``, ``environment``: schema default ``{}``.
    - ``reproducibility.experiment_seed``: chosen by the master when missing.
    - ``environment.image``: the task container default images; a map missing ``cpu``,
      ``cuda`` or ``rocm`` gets the default for the missing ones (the legacy ``gpu`` key is
      migrated to ``cuda`` by the master, and ``cuda`` is filled either way).

    Never filled: ``searcher`` (and its ``name`` and ``metric``), ``entrypoint``, or anything in
    a user-written checkpoint storage, retention policy or searcher.
    """
    out = copy.deepcopy(dict(config))

    storage = out.get("checkpoint_storage")
    if storage is None or (_is_object(storage) and storage.get("type") is None):
        out["checkpoint_storage"] = copy.deepcopy(PLACEHOLDER_CHECKPOINT_STORAGE)

    if out.get("name") is None:
        out["name"] = PLACEHOLDER_NAME
    if out.get("hyperparameters") is None:
        out["hyperparameters"] = {}

    if out.get("reproducibility") is None:
        out["reproducibility"] = {}
    reproducibility = out["reproducibility"]
    if _is_object(reproducibility) and reproducibility.get("experiment_seed") is None:
        reproducibility["experiment_seed"] = PLACEHOLDER_SEED

    if out.get("environment") is None:
        out["environment"] = {}
    environment = out["environment"]
    if _is_object(environment):
        image = environment.get("image")
        if image is None:
            environment["image"] = dict.fromkeys(IMAGE_FLAVORS, PLACEHOLDER_IMAGE)
        elif _is_object(image):
            for flavor in IMAGE_FLAVORS:
                if image.get(flavor) is None:
                    image[flavor] = PLACEHOLDER_IMAGE
    return out


def _master_runtime_errors(config: Mapping[str, Any]) -> list[str]:
    """The checks the master makes in code after the schemas (``parseCreateExperiment``)."""
    errors: list[str] = []
    if config.get("entrypoint") is None:
        # Our tooling submits managed experiments, which the master refuses without one.
        errors.append(f"{format_path([])}: entrypoint is a required property (managed experiments)")
    searcher = config.get("searcher")
    name = searcher.get("name") if _is_object(searcher) else None
    path = format_path(["searcher", "name"])
    if name in REMOVED_SEARCHERS:
        errors.append(
            f"{path}: the {name!r} searcher has been removed and is not valid for new experiments"
        )
    elif name in SEARCHERS_NEEDING_TIME:
        missing = [key for key in ("max_time", "time_metric") if searcher.get(key) is None]
        if missing:
            errors.append(
                f"{format_path(['searcher'])}: the {name!r} searcher requires max_time and "
                f"time_metric to be set (missing: {', '.join(missing)})"
            )
    return errors


def validate_experiment(config: JSON, validator: ExpconfValidator | None = None) -> list[str]:
    """Every reason a Determined 0.38 master would refuse to create this experiment.

    Reproduces the master's ``parseCreateExperiment``: (1) sanity check of the config as
    written; (2) merge in cluster defaults and apply schema defaults -- stood in for by
    `fill_master_defaults` -- then the completeness check; (3) the checks the master makes in
    code: managed experiments need an ``entrypoint``, removed searchers (``custom``,
    ``adaptive``, ``adaptive_simple``, ``sync_halving``) are refused, and ``adaptive_asha`` /
    ``async_halving`` need ``max_time`` and ``time_metric``.

    Returns one line per problem, each prefixed with its JSON path; empty means valid. Not
    covered (needs a live cluster): the resource pool exists and has enough slots, templates,
    and workspace/project names.
    """
    checker = validator or get_validator()
    errors = checker.sanity_errors(config)
    if not _is_object(config):
        return errors
    complete = checker.completeness_errors(fill_master_defaults(config))
    # The completeness pass re-reports the sanity errors; keep each line once, sanity first.
    extra = [line for line in complete + _master_runtime_errors(config) if line not in errors]
    return errors + list(dict.fromkeys(extra))


__all__ = [
    "EXPERIMENT_SCHEMA",
    "ExpconfValidator",
    "completeness_errors",
    "default_schema_dir",
    "fill_master_defaults",
    "format_path",
    "get_validator",
    "load_schemas",
    "sanity_errors",
    "validate_experiment",
]
