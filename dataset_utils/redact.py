"""One flatten + scrub for everything that leaves the run for a tracking store.

Hyperparameters, the experiment config and evaluation params reach MLflow (the live logger in
`trainer.callbacks`, the mirror, the evaluation runs) and the checkpoint manifest
(``text2sql.json``, uploaded with every checkpoint) only through this module:

- `scrub` returns a copy of a nested config with credentials replaced by ``***``;
- `tracking_params` flattens a nested config to MLflow params (``training_args.hub_token``),
  scrubbed, with MLflow's key and value length limits applied.

What counts as a credential:

- a key naming one: ``password``, ``passwd``, ``pass``, ``secret``, ``credential(s)``,
  ``api_key``, ``access_key``, ``private_key``, ``auth``, or ending in ``token`` (``hub_token``,
  ``token``; not ``max_new_tokens`` nor the tokenizer's ``pad_token`` / ``eos_token`` ...):
  the value becomes ``***`` and the key stays (a viewer sees that one was set);
- every value under ``environment_variables`` (Determined's ``KEY=VALUE`` list, or its
  ``cpu``/``cuda``/``rocm`` mapping of such lists): ``KEY=***``, whatever the key, since an
  environment variable is the usual way to hand a job a secret;
- inside any string: the user info of a URL (``https://user:pass@host`` -> ``https://host``),
  ``KEY=VALUE`` / ``KEY: VALUE`` pairs whose key names a credential, and well-known token
  shapes (Hugging Face ``hf_...``, GitHub ``ghp_...``, OpenAI ``sk-...``, AWS ``AKIA...``,
  Slack ``xox?-...``).

This module imports nothing from the project, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
# MLflow's limits: param keys 250 characters, values 6000 (mlflow.utils.validation).
MAX_KEY = 250
MAX_VALUE = 6000

_SECRET_WORD = re.compile(
    r"passw(or)?d|(^|_)pass($|_)|secret|credential|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|(^|_)auth($|_)|token$",
    re.I,
)
# Tokenizer special tokens are vocabulary entries, not credentials.
_VOCAB_TOKEN = re.compile(r"(pad|eos|bos|unk|sep|cls|mask|special|start|end|stop)_?token$", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_KNOWN_TOKENS = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})"
)
_ASSIGNMENT = re.compile(
    r"(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<op>\s*[=:]\s*)(?P<value>[^\s,;&'\"]+)"
)
_ENV_SECTION = "environment_variables"


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a credential (see the module docstring)."""
    for part in re.split(r"[.]", str(key)):
        if _SECRET_WORD.search(part) and not _VOCAB_TOKEN.search(part):
            return True
    return False


def without_credentials(url: str) -> str:
    """``https://user:token@host/x.git`` -> ``https://host/x.git``, also inside a longer string
    (``pip install git+https://u:p@host/x``); scp-style ``git@host:x.git`` names the ssh user
    only and is kept."""
    return _URL_USERINFO.sub(r"\g<scheme>", url)


def scrub_text(text: str) -> str:
    """A string with URL credentials, secret ``KEY=VALUE`` pairs and known token shapes
    replaced."""
    text = without_credentials(text)
    text = _KNOWN_TOKENS.sub(REDACTED, text)

    def assignment(m: re.Match[str]) -> str:
        if is_secret_key(m.group("key")) and m.group("value") != REDACTED:
            return f"{m.group('key')}{m.group('op')}{REDACTED}"
        return m.group(0)

    return _ASSIGNMENT.sub(assignment, text)


def _env_entry(value: Any) -> Any:
    """An ``environment_variables`` entry: ``KEY=VALUE`` -> ``KEY=***`` (a mapping's values
    likewise)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:  # already flattened to JSON (a params dict scrubbed twice)
            return json.dumps(_env_entry(json.loads(value)))
        except ValueError:
            pass
    if isinstance(value, str):
        key, sep, _ = value.partition("=")
        return f"{key}={REDACTED}" if sep else REDACTED
    if isinstance(value, Mapping):
        return {str(k): _env_entry(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_env_entry(v) for v in value]
    return REDACTED if value is not None else None


def scrub(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (nested mappings, lists, dataclasses, scalars) with every credential
    replaced by ``***``; ``key`` is the dotted path of ``value`` itself."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    last = key.rsplit(".", 1)[-1]
    if last == _ENV_SECTION:
        return _env_entry(value)
    if key and is_secret_key(last) and value not in (None, "") and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): scrub(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, key) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``; lists stay whole (as JSON in `tracking_params`)."""
    out: dict[str, Any] = {}

    def walk(key: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, sub in v.items():
                walk(f"{key}.{k}" if key else str(k), sub)
        else:
            out[key] = v

    walk(prefix, value)
    return out


def tracking_params(value: Any, prefix: str = "") -> dict[str, str]:
    """MLflow params for a nested config (a mapping or dataclass): flattened to dotted keys,
    scrubbed, lists as JSON, every value a string within MLflow's limits."""
    out: dict[str, str] = {}
    for k, v in flatten(scrub(value, prefix), prefix).items():
        text = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
        out[k[:MAX_KEY]] = text[:MAX_VALUE]
    return out
