"""Official public downloads of datasets the Hub does not carry whole (Spider's databases).

Spider's rows are on the HuggingFace Hub (``xlangai/spider``), but its SQLite databases are
not, and execution accuracy needs them. The publisher's release archive, ``spider_data.zip``
(linked from https://yale-lily.github.io/spider, hosted on Google Drive), has both. A source
with no local copy is therefore resolved as (`dataset_utils.sources.load_source`):

1. its ``path:``, else the local data folder (``$TEXT2SQL_DATA`` or ``../shared/data``);
2. a copy fetched earlier into the cache: ``$TEXT2SQL_CACHE/data/<name>/``;
3. the Hub, for formats whose Hub copy is complete (not Spider: no databases there);
4. the official download, into that cache (this module).

``fetch`` downloads with a progress bar (tqdm, through ``huggingface_hub``'s ``http_get``:
retries and HTTP range resume), into ``$TEXT2SQL_CACHE/downloads/<file>.part``; an
interrupted download (network cut, Ctrl-C) resumes from there on the next call. The archive
must then be a zip with the expected SHA-256, and is extracted into a temporary folder that is
renamed into place only once it holds every expected file: a wrong checksum or a bad archive is
one error, with nothing half-extracted left behind. A file lock serializes concurrent callers
(ranks of one run, two runs).

Knobs (environment):

- ``TEXT2SQL_DOWNLOAD_BASE``: a mirror holding the same files (``<base>/spider_data.zip``),
  instead of the publisher's URL; tests point it at a local HTTP server.
- ``TEXT2SQL_<NAME>_SHA256`` (``TEXT2SQL_SPIDER_SHA256``): the expected checksum, should the
  publisher re-release the archive.
- ``HF_HUB_OFFLINE=1``: no download at all (like ``datasets``, which treats it as "no
  network"); the error says what to set instead.

Ahead of time: ``text2sql data fetch spider`` (or ``--archive spider_data.zip`` for a file
downloaded by hand, e.g. when Google Drive asks a browser to confirm).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import filelock
from tqdm.auto import tqdm

from dataset_utils.errors import UserError
from dataset_utils.settings import cache_dir, hub_offline

ENV_BASE = "TEXT2SQL_DOWNLOAD_BASE"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
# Zip-bomb guard: Spider unpacks to ~1 GB.
_MAX_UNPACKED_BYTES = 8 << 30


@dataclass(frozen=True)
class Download:
    """One dataset's official release archive and what it must contain.

    Attributes:
        name: what ``text2sql data fetch`` calls it, and the cache folder's name.
        format: the `dataset_utils.sources.FORMATS` entry it provides rows (and databases) for.
        filename: the archive's file name (also its name on a mirror).
        url: the publisher's download URL.
        sha256: expected SHA-256 of the archive.
        sha256_note: where that checksum comes from.
        root: the folder inside the archive that holds the data (stripped on extraction).
        required: paths that must exist under ``root`` once extracted.
        page: where a person downloads it by hand.
        license: the data's license.
    """

    name: str
    format: str
    filename: str
    url: str
    sha256: str
    sha256_note: str
    root: str
    required: tuple[str, ...]
    page: str
    license: str
    size_note: str = ""

    @property
    def sha256_env(self) -> str:
        return f"TEXT2SQL_{self.name.upper().replace('-', '_')}_SHA256"


REGISTRY: dict[str, Download] = {
    "spider": Download(
        name="spider",
        format="spider",
        filename="spider_data.zip",
        # The "Spider 1.0 dataset" link of https://yale-lily.github.io/spider is the Google
        # Drive file 1403EGqzIDoHMdQF4c9Bkyl7dZLZ5Wt6J (spider_data.zip, re-released
        # 2024-09); drive.usercontent.google.com with confirm=t serves the file itself
        # instead of the "cannot scan this file for viruses" page big files get.
        url=(
            "https://drive.usercontent.google.com/download?"
            "id=1403EGqzIDoHMdQF4c9Bkyl7dZLZ5Wt6J&export=download&confirm=t"
        ),
        # Not verified by this project (its build machine has no internet): the same digest
        # is recorded, computed from the official download, by several unrelated public
        # projects. Override with TEXT2SQL_SPIDER_SHA256 or --sha256.
        sha256="00636695dabed6b5f4b8328a16b13e069a2f16591d5efcce57660669c85b121b",
        sha256_note=(
            "as recorded from the official download by several independent public projects; "
            "not verified against the publisher here"
        ),
        root="spider_data",
        required=("train_spider.json", "dev.json", "tables.json", "database"),
        page="https://yale-lily.github.io/spider",
        license="CC BY-SA 4.0",
        size_note="~206 MB, ~1 GB unpacked",
    ),
}


def for_format(fmt: str) -> Download | None:
    """The registry entry that provides ``fmt`` (None: the Hub is its only remote source)."""
    return next((d for d in REGISTRY.values() if d.format == fmt), None)


def get(name: str) -> Download:
    if name not in REGISTRY:
        raise UserError(
            f"no official download named {name!r}; known: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def data_root() -> Path:
    """Where fetched datasets are extracted: ``$TEXT2SQL_CACHE/data``."""
    return cache_dir("data")


def fetched_path(download: Download) -> Path | None:
    """The extracted dataset when a previous fetch completed, else None."""
    path = data_root() / download.name
    return path if path.is_dir() else None


def source_url(download: Download) -> str:
    base = os.environ.get(ENV_BASE, "").strip()
    return f"{base.rstrip('/')}/{download.filename}" if base else download.url


def expected_sha256(download: Download, override: str | None = None) -> str:
    value = (override or os.environ.get(download.sha256_env) or download.sha256).strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise UserError(
            f"expected SHA-256 for {download.filename} must be 64 hex digits, found {value!r} "
            f"(from {'--sha256' if override else download.sha256_env})"
        )
    return value


def offline_message(download: Download, local_folder: str | None = None) -> str:
    """What to do when the data is needed, not local, and downloads are off."""
    return (
        f"{download.format} data is not available locally and downloads are off "
        f"(HF_HUB_OFFLINE=1). Set TEXT2SQL_DATA to a folder holding "
        f"{local_folder or download.name}/ "
        f"(its {download.filename} unpacked: {', '.join(download.required)}), or give the "
        "source a path:, or run `text2sql data fetch "
        f"{download.name}` where there is internet (or with --archive <{download.filename}> "
        "downloaded by hand from "
        f"{download.page}), or unset HF_HUB_OFFLINE to download it now"
    )


def fetch(
    name: str,
    *,
    archive: str | Path | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Make dataset ``name`` available in the cache and return its folder.

    ``archive``: a local copy of the release archive (verified and extracted, left in place).
    ``force``: extract again even if a fetched copy exists.
    """
    download = get(name)
    want = expected_sha256(download, sha256)
    downloads = cache_dir("downloads")
    with filelock.FileLock(str(downloads / f"{download.filename}.lock")):
        done = fetched_path(download)
        if done is not None and not force:
            return done
        if archive is not None:
            path = Path(archive).expanduser()
            if not path.is_file():
                raise UserError(f"archive {path} does not exist")
            _verify(path, want, download, origin=str(path), delete_on_mismatch=False)
        else:
            if hub_offline():
                raise UserError(offline_message(download))
            path = _download(download, downloads, progress=progress)
            _verify(path, want, download, origin=source_url(download), delete_on_mismatch=True)
        target = _extract(path, download, progress=progress)
        if archive is None:
            path.unlink(missing_ok=True)  # ~200 MB; the extracted folder is what is used
        return target


def _download(download: Download, folder: Path, *, progress: bool) -> Path:
    """Download into ``<file>.part`` (resuming what is there), then rename to ``<file>``."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    final = folder / download.filename
    if final.is_file():  # downloaded, not yet verified/extracted (killed in between)
        return final
    part = folder / f"{download.filename}.part"
    url = source_url(download)
    resume = part.stat().st_size if part.is_file() else 0
    print(
        f"downloading {download.filename} ({download.size_note or 'size unknown'}) from {url}"
        + (f", resuming at {resume:,} bytes" if resume else "")
        + f" into {folder}",
        flush=True,
    )
    if not progress:
        disable_progress_bars()
    try:
        with part.open("ab") as fh:
            http_get(url, fh, resume_size=resume, displayed_filename=download.filename)
    except KeyboardInterrupt:
        print(f"download interrupted; run again to resume from {part}", flush=True)
        raise
    except Exception as e:  # noqa: BLE001 - network, HTTP status, offline: one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"could not download {download.filename} from {url}: {type(e).__name__}: "
            f"{first[:200]}. What was received is kept in {part} and the next attempt "
            f"resumes it. Alternatives: download it by hand from {download.page} and run "
            f"`text2sql data fetch {download.name} --archive <file>`; set {ENV_BASE} to a "
            f"mirror holding {download.filename}; or set TEXT2SQL_DATA to a folder holding "
            f"{download.name}/"
        ) from None
    finally:
        if not progress:
            enable_progress_bars()
    os.replace(part, final)
    return final


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(
    path: Path, want: str, download: Download, *, origin: str, delete_on_mismatch: bool
) -> None:
    with path.open("rb") as fh:
        head = fh.read(512)
    if not head.startswith(_ZIP_MAGIC):
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        looks_html = head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        raise UserError(
            f"{origin} is not a zip archive"
            + (
                " (the server sent a web page, e.g. Google Drive's quota or confirmation page)"
                if looks_html
                else ""
            )
            + f"; download {download.filename} by hand from {download.page} and run "
            f"`text2sql data fetch {download.name} --archive <file>`"
        )
    got = file_sha256(path)
    if got != want:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise UserError(
            f"checksum mismatch for {download.filename} from {origin}: expected SHA-256 {want}, "
            f"got {got}"
            + ("; the file was deleted" if delete_on_mismatch else "")
            + ". Nothing was extracted. If the publisher re-released the archive and you trust "
            f"it, set {download.sha256_env}={got} (or pass --sha256)"
        )


def _safe_members(zf: zipfile.ZipFile, download: Download) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Members under the archive's root folder, with their path relative to it.

    Refuses absolute paths, ``..``, symlinks and archives that unpack to more than
    `_MAX_UNPACKED_BYTES`; ignores macOS resource forks (``__MACOSX/``)."""
    out = []
    total = 0
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        pure = PurePosixPath(name)
        if pure.parts and pure.parts[0] == "__MACOSX":
            continue
        if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
            raise UserError(f"{download.filename}: unsafe path in archive: {info.filename!r}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UserError(f"{download.filename}: symbolic link in archive: {info.filename!r}")
        total += info.file_size
        if total > _MAX_UNPACKED_BYTES:
            raise UserError(f"{download.filename}: unpacks to more than {_MAX_UNPACKED_BYTES:,} B")
        parts = pure.parts
        if parts and parts[0] == download.root:
            parts = parts[1:]
        if not parts or parts[-1] == ".DS_Store":
            continue
        out.append((info, Path(*parts)))
    return out


def _extract(archive: Path, download: Download, *, progress: bool) -> Path:
    root = data_root()
    target = root / download.name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{download.name}-", dir=root))
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as e:
            raise UserError(f"{archive} is not a valid zip archive: {e}") from None
        with zf:
            members = _safe_members(zf, download)
            size = sum(info.file_size for info, _ in members)
            with tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc=f"extracting {download.filename}",
                disable=not progress,
            ) as bar:
                for info, rel in members:
                    dest = tmp / rel
                    if info.is_dir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with zf.open(info) as src, dest.open("wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        if isinstance(e, OSError) and e.errno is not None:
                            raise  # disk full and friends: the CLI names them
                        raise UserError(
                            f"{archive}: member {info.filename} is damaged ({e})"
                        ) from None
                    bar.update(info.file_size)
        missing = [r for r in download.required if not (tmp / r).exists()]
        if missing:
            raise UserError(
                f"{archive} does not have the {download.name} layout: missing "
                f"{', '.join(missing)} under {download.root}/"
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dbs = target / "database"
    n_db = sum(1 for p in dbs.iterdir() if p.is_dir()) if dbs.is_dir() else 0
    print(
        f"{download.name}: extracted to {target}"
        + (f" ({n_db} databases)" if n_db else "")
        + f"; license {download.license}",
        flush=True,
    )
    return target


def status_line(download: Download) -> str:
    where = fetched_path(download)
    state = f"fetched: {where}" if where else "not fetched"
    return f"{download.name:10s} {download.filename:18s} {state}  ({download.page})"
