"""Spider's official release archive: download, checksum, resume, unpack, offline.

A local HTTP server (127.0.0.1, started here) stands in for the public URL and serves an
archive in the official layout (`tests.spider_archive`); ``TEXT2SQL_DOWNLOAD_BASE`` points the
downloader at it. Downloads run in a subprocess (``text2sql data fetch``) because
``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import, and the test session runs with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataset_utils.errors import UserError
from tests.conftest import REPO_ROOT
from tests.spider_archive import Archive, ArchiveServer, build_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    return build_archive(tmp_path_factory.mktemp("official"))


@pytest.fixture
def server(archive: Archive) -> Iterator[ArchiveServer]:
    srv = ArchiveServer(archive.path.parent)
    yield srv
    srv.close()


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TEXT2SQL_DATA"}}
    (tmp / "no-local-data").mkdir(exist_ok=True)
    env.update(
        {
            "TEXT2SQL_CACHE": str(tmp / "cache"),
            "TEXT2SQL_DATA": str(tmp / "no-local-data"),  # no ../shared copy of Spider
            "PYTHONPATH": str(REPO_ROOT),
            "NO_PROXY": "127.0.0.1,localhost",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            **extra,
        }
    )
    return env


def _text2sql(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        env=_env(tmp, **env),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _leftovers(cache: Path) -> list[str]:
    """Everything under the cache's data and downloads folders except lock files."""
    out = []
    for sub in ("data", "downloads"):
        folder = cache / sub
        if folder.is_dir():
            out += [f"{sub}/{p.name}" for p in folder.iterdir() if p.suffix != ".lock"]
    return sorted(out)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def test_fetch_verifies_unpacks_and_the_loader_reads_it(
    tmp_path: Path, archive: Archive, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _text2sql(
        tmp_path,
        "data",
        "fetch",
        "spider",
        TEXT2SQL_DOWNLOAD_BASE=server.url,
        TEXT2SQL_SPIDER_SHA256=archive.sha256,
    )
    assert r.returncode == 0, r.stderr
    target = tmp_path / "cache" / "data" / "spider"
    assert f"ready in {target}" in r.stdout
    # The official layout, root folder stripped, macOS resource forks dropped.
    for rel in ("train_spider.json", "dev.json", "tables.json", "dev_gold.sql"):
        assert (target / rel).is_file(), rel
    dbs = sorted(p.name for p in (target / "database").iterdir())
    assert dbs == ["book_shop", "concert_hall", "museum_visits", "pet_clinic"]
    assert not (target / "__MACOSX").exists()
    # Nothing else is left: the archive is deleted after a verified extraction.
    assert _leftovers(tmp_path / "cache") == ["data/spider"]
    assert server.requests == [{"path": "/spider_data.zip", "range": None}]

    # The loader finds it with no local data folder, offline (it is in the cache now).
    from dataset_utils.sources import SourceSpec, load_source

    monkeypatch.setenv("TEXT2SQL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path / "no-local-data"))
    dev = load_source(SourceSpec(format="spider", split="dev")).examples
    assert [(e.question, e.sql, e.db_id) for e in dev] == [
        (r["question"], r["query"], r["db_id"]) for r in archive.dev
    ]
    assert all(Path(e.db_path or "").is_relative_to(target / "database") for e in dev)
    assert dev[0].context.startswith("CREATE TABLE museum (museum_id INTEGER")
    train = load_source(SourceSpec(format="spider", split="train")).examples
    assert len(train) == len(archive.train)

    # A second fetch is a no-op (no request).
    again = _text2sql(
        tmp_path,
        "data",
        "fetch",
        "spider",
        TEXT2SQL_DOWNLOAD_BASE=server.url,
        TEXT2SQL_SPIDER_SHA256=archive.sha256,
    )
    assert again.returncode == 0 and "already fetched" in again.stdout
    assert len(server.requests) == 1


def test_wrong_checksum_is_one_error_and_leaves_nothing(
    tmp_path: Path, server: ArchiveServer, archive: Archive
) -> None:
    r = _text2sql(
        tmp_path,
        "data",
        "fetch",
        "spider",
        TEXT2SQL_DOWNLOAD_BASE=server.url,
        TEXT2SQL_SPIDER_SHA256="0" * 64,
    )
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "checksum mismatch for spider_data.zip" in line
    assert f"got {archive.sha256}" in line and "Nothing was extracted" in line
    assert "TEXT2SQL_SPIDER_SHA256" in line
    assert _leftovers(tmp_path / "cache") == []


def test_connection_cut_mid_download_resumes_with_a_range_request(tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: cut the connection after 15 MiB of a 24 MiB
    # archive, and the download must resume at 10 MiB with a range request.
    archive = build_archive(tmp_path / "official", filler_mb=24)
    srv = ArchiveServer(archive.path.parent, cut_first_at=15 << 20)
    try:
        r = _text2sql(
            tmp_path,
            "data",
            "fetch",
            "spider",
            TEXT2SQL_DOWNLOAD_BASE=srv.url,
            TEXT2SQL_SPIDER_SHA256=archive.sha256,
        )
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr
    assert [q["range"] for q in srv.requests] == [None, f"bytes={10 << 20}-"]
    assert "Trying to resume download" in r.stderr
    assert (tmp_path / "cache" / "data" / "spider" / "dev.json").is_file()


def test_partial_file_from_an_earlier_run_is_resumed(
    tmp_path: Path, archive: Archive, server: ArchiveServer
) -> None:
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "spider_data.zip.part").write_bytes(archive.path.read_bytes()[:1000])
    r = _text2sql(
        tmp_path,
        "data",
        "fetch",
        "spider",
        TEXT2SQL_DOWNLOAD_BASE=server.url,
        TEXT2SQL_SPIDER_SHA256=archive.sha256,
    )
    assert r.returncode == 0, r.stderr
    assert "resuming at 1,000 bytes" in r.stdout
    assert server.requests == [{"path": "/spider_data.zip", "range": "bytes=1000-"}]
    assert _leftovers(tmp_path / "cache") == ["data/spider"]


def test_offline_without_local_data_names_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _text2sql(tmp_path, "data", "fetch", "spider", HF_HUB_OFFLINE="1")
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    for what in ("HF_HUB_OFFLINE=1", "TEXT2SQL_DATA", "text2sql data fetch spider", "--archive"):
        assert what in line, what
    # The main job stops on the same line, before any run folder is written.
    run = _text2sql(
        tmp_path,
        "run",
        str(REPO_ROOT / "experiments" / "smollm2-135m-lora-cpu.yaml"),
        "--runs-dir",
        str(tmp_path / "runs"),
        HF_HUB_OFFLINE="1",
    )
    assert run.returncode == 2
    assert "TEXT2SQL_DATA" in _one_error_line(run.stderr)
    assert not (tmp_path / "runs").exists()
    assert _leftovers(tmp_path / "cache") == []

    from dataset_utils.sources import SourceSpec, load_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TEXT2SQL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TEXT2SQL_DATA", str(tmp_path / "no-local-data"))
    with pytest.raises(UserError, match="downloads are off"):
        load_source(SourceSpec(format="spider"))


def test_unreachable_server_keeps_the_partial_file_and_says_what_to_do(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _text2sql(
        tmp_path, "data", "fetch", "spider", TEXT2SQL_DOWNLOAD_BASE=f"http://127.0.0.1:{port}"
    )
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert (
        f"could not download spider_data.zip from http://127.0.0.1:{port}/spider_data.zip" in line
    )
    assert "--archive" in line and "TEXT2SQL_DOWNLOAD_BASE" in line
    assert not (tmp_path / "cache" / "data" / "spider").exists()


def test_a_web_page_instead_of_the_archive_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "www"
    page.mkdir()
    (page / "spider_data.zip").write_text("<!DOCTYPE html><html>Google Drive - quota</html>")
    srv = ArchiveServer(page)
    try:
        r = _text2sql(tmp_path, "data", "fetch", "spider", TEXT2SQL_DOWNLOAD_BASE=srv.url)
    finally:
        srv.close()
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "is not a zip archive (the server sent a web page" in line
    assert "yale-lily.github.io/spider" in line
    assert _leftovers(tmp_path / "cache") == []


def test_archive_option_works_offline_and_bad_archives_leave_nothing(
    tmp_path: Path, archive: Archive
) -> None:
    # Downloaded by hand: verified and unpacked with downloads off; the file is left in place.
    ok = _text2sql(
        tmp_path,
        "data",
        "fetch",
        "spider",
        "--archive",
        str(archive.path),
        "--sha256",
        archive.sha256,
        "--no-progress",
        HF_HUB_OFFLINE="1",
    )
    assert ok.returncode == 0, ok.stderr
    assert archive.path.is_file()
    assert (tmp_path / "cache" / "data" / "spider" / "database" / "museum_visits").is_dir()

    def bad_zip(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for arcname, data in members.items():
                zf.writestr(arcname, data)
        return path

    import hashlib

    cases = {
        "no-database.zip": (
            {
                "spider_data/dev.json": b"[]",
                "spider_data/train_spider.json": b"[]",
                "spider_data/tables.json": b"[]",
            },
            "does not have the spider layout: missing database",
        ),
        "escape.zip": ({"spider_data/../../evil.txt": b"x"}, "unsafe path in archive"),
    }
    for name, (members, message) in cases.items():
        cache = tmp_path / f"cache-{name}"
        path = bad_zip(name, members)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        r = _text2sql(
            tmp_path,
            "data",
            "fetch",
            "spider",
            "--archive",
            str(path),
            "--sha256",
            sha,
            HF_HUB_OFFLINE="1",
            TEXT2SQL_CACHE=str(cache),
        )
        assert r.returncode == 2, name
        assert message in _one_error_line(r.stderr), name
        assert _leftovers(cache) == [], name
    assert not (tmp_path / "evil.txt").exists()
