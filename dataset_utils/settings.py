"""Where things live on disk: the cache directory and the local data directory.

One place decides these paths so that nothing writes caches into the working directory.

- Cache: ``$TEXT2SQL_CACHE`` or ``~/.cache/text2sql`` (tokenized datasets, converted models,
  synthetic evaluation databases).
- Local data: an explicit path if given; else ``$TEXT2SQL_DATA``; else ``shared/data`` beside
  the repository checkout (``../shared/data`` from the repo root, as CI lays it out); else
  ``../shared/data`` from the current directory. ``None`` when none exists, in which case
  loaders fall back to the HuggingFace Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir(*parts: str) -> Path:
    """Return (and create) a directory under the project cache."""
    base = Path(os.environ.get("TEXT2SQL_CACHE") or Path.home() / ".cache" / "text2sql")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The local data directory holding real public samples, or None when absent."""
    env = os.environ.get("TEXT2SQL_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def hub_offline() -> bool:
    """True when the HuggingFace Hub must not be contacted."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in {"1", "true", "yes"}
