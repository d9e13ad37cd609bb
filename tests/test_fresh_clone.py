"""README command 1 in a fresh clone with no ``../shared``: the data comes from the official
Spider release, served from a local HTTP server standing in for its public URL (slow).

The clone lives in a temporary folder (nothing beside it), ``TEXT2SQL_DATA`` is unset, the
cache is empty (but for the converted embedded model, shared to save 25 s) and
``HF_HUB_OFFLINE`` is not set, as on a user's machine with internet. ``TEXT2SQL_DOWNLOAD_BASE``
points the Spider download at the local server, which serves an archive in the official layout
(`tests.spider_archive`); the command's install steps are dropped and the job is capped
(`tests.readme_blocks.TINY_OVERRIDES`).

The main job must then download, verify and unpack the archive, train, evaluate and register
its model. Datasets the main job takes from the HuggingFace Hub (not Spider) cannot be reached
from a test; if the job's YAML lists one, this test fails saying so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from tests import readme_blocks as rb
from tests.conftest import REPO_ROOT
from tests.spider_archive import ArchiveServer, build_archive
from tests.test_readme_commands import base_env, copy_repo, fresh_cache, run_block

pytestmark = pytest.mark.slow


def test_readme_command_one_in_a_clone_without_shared(tmp_path: Path) -> None:
    clone = copy_repo(tmp_path / "clone" / "text2sql-finetune")
    assert not (clone.parent / "shared").exists()
    archive = build_archive(tmp_path / "official")
    server = ArchiveServer(archive.path.parent)
    env = base_env(clone, fresh_cache(tmp_path / "cache"))
    env.update(TEXT2SQL_DOWNLOAD_BASE=server.url, TEXT2SQL_SPIDER_SHA256=archive.sha256)
    command = next(b for b in rb.blocks(clone / "README.md") if b.mode == "tiny")
    t0 = time.monotonic()
    try:
        rc, out = run_block(
            rb.tiny_command(command.text),
            clone,
            env,
            tmp_path / "command1.log",
            float(os.environ.get("TEXT2SQL_SLOW_TIMEOUT_S", "3600")),
        )
    finally:
        server.close()
    print(f"README command 1 (capped) in a fresh clone: rc {rc}, {time.monotonic() - t0:.0f} s")
    if rc != 0:
        cfg = yaml.safe_load((REPO_ROOT / rb.MAIN_JOB).read_text())
        hub_only = [
            s["format"]
            for s in cfg["hyperparameters"]["data"]["sources"]
            if s["format"] != "spider" and not s.get("path")
        ]
        hint = (
            f" The main job also reads {hub_only} from the HuggingFace Hub, which a test "
            "cannot reach."
            if hub_only
            else ""
        )
        pytest.fail(f"README command 1 failed ({rc}).{hint}\n{out[-6000:]}")
    # The archive was fetched once from the stand-in URL, verified and unpacked into the cache.
    assert [r["path"] for r in server.requests] == ["/spider_data.zip"]
    assert "downloading spider_data.zip" in out and "spider: extracted to" in out
    spider = tmp_path / "cache" / "data" / "spider"
    assert (spider / "database" / "museum_visits" / "museum_visits.sqlite").is_file()
    # No partial download left (the empty lock file that serializes fetches may stay).
    left = [p for p in (tmp_path / "cache" / "downloads").glob("spider_data.zip*")]
    assert [p for p in left if p.suffix != ".lock"] == [], left
    # ... and the job ran to the end: trained, evaluated, registered, round trip verified.
    assert "round trip verified" in out, out[-4000:]
    assert "model smollm2-135m-lora-cpu version 1" in out
    trial = clone / "runs" / "smollm2-135m-lora-cpu" / "trial-1"
    assert (trial / "curves.png").is_file()
    assert list(trial.glob("evaluation-*/report.md"))
