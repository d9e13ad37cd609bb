"""Load every supported text-to-SQL corpus into normalized `Example` records.

Supported formats (``SourceSpec.format``) and their original columns:

==================  ==============================================  ==============================
format              columns                                         HuggingFace dataset id
==================  ==============================================  ==============================
clinton             instruction, input, response (source, text)     Clinton/Text-to-sql-v1
sql-create-context  question, context, answer                       b-mc2/sql-create-context
gretel              sql_prompt, sql_context, sql (+ domain,         gretelai/synthetic_text_to_sql
                    sql_complexity, sql_task_type, ...)
spider              question, query, db_id + ``database/`` folder   xlangai/spider (no databases:
                                                                    pass ``database_dir``)
custom              any; ``columns`` maps question/context/sql      --
==================  ==============================================  ==============================

Resolution order for where rows come from: an explicit ``path`` (absolute, or relative to the
local data directory, or to the current directory); else the format's default file inside the
local data directory (``../shared/data`` beside the checkout, or ``$TEXT2SQL_DATA``) when it
exists -- for Spider ``spider/`` (the release layout: ``train_spider.json(l)``, ``dev.json(l)``,
``tables.json``, ``database/``), falling back to the dev-only ``spider_dev/`` for ``split: dev``;
else, for Spider (whose Hub copy has no databases), the official release archive, fetched once
into ``$TEXT2SQL_CACHE/data`` (`dataset_utils.downloads`); else the HuggingFace Hub. Offline
with none of them, one `UserError` says how to point the loader at local files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils import downloads
from dataset_utils.errors import UserError
from dataset_utils.records import Example
from dataset_utils.schema import (
    FOREIGN_KEY_SOURCES,
    SCHEMA_STYLES,
    relevant_tables,
    schema_from_sqlite,
)
from dataset_utils.settings import hub_offline, shared_data_dir


@dataclass(frozen=True)
class FormatInfo:
    question: str
    context: str | None
    sql: str
    hub_id: str | None
    # Candidates inside the local data directory, first match wins (Spider: the full release
    # layout ``spider/`` when it holds the requested split, else the dev-only ``spider_dev/``).
    local_default: tuple[str, ...]
    extras: tuple[str, ...] = ()
    instruction: str | None = None


FORMATS: dict[str, FormatInfo] = {
    "clinton": FormatInfo(
        question="instruction",
        context="input",
        sql="response",
        hub_id="Clinton/Text-to-sql-v1",
        local_default=("clinton",),
        extras=("source",),
    ),
    "sql-create-context": FormatInfo(
        question="question",
        context="context",
        sql="answer",
        hub_id="b-mc2/sql-create-context",
        local_default=("sql-create-context/sample.jsonl",),
    ),
    "gretel": FormatInfo(
        question="sql_prompt",
        context="sql_context",
        sql="sql",
        hub_id="gretelai/synthetic_text_to_sql",
        local_default=("gretel",),
        extras=(
            "id",
            "domain",
            "domain_description",
            "sql_complexity_description",
            "sql_task_type",
            "sql_task_type_description",
            "sql_explanation",
        ),
    ),
    "spider": FormatInfo(
        question="question",
        context=None,
        sql="query",
        hub_id="xlangai/spider",
        local_default=("spider", "spider_dev"),
    ),
    "custom": FormatInfo(
        question="question", context="context", sql="sql", hub_id=None, local_default=()
    ),
}

# Spider's own file names (the release archive has .json, our staged copy .jsonl).
# ``train_others`` is Spider's extra training split (questions over Restaurants/GeoQuery/...
# databases); ``train`` is Spider train proper, as the papers use it.
_SPIDER_SPLIT_FILES = {
    "dev": ("dev.jsonl", "dev.json"),
    "validation": ("dev.jsonl", "dev.json"),
    "train": ("train_spider.jsonl", "train_spider.json", "train.jsonl", "train.json"),
    "train_others": ("train_others.jsonl", "train_others.json"),
    "test": ("test.jsonl", "test.json"),
}
# What a source is used for: ``split`` = the ratio split (`data.split`) as before; ``train`` /
# ``valid`` / ``test`` = every row of it goes to that split (e.g. Spider dev as the test set).
SOURCE_USES = ("split", "train", "valid", "test")
_TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass(frozen=True)
class SourceSpec:
    """Where one dataset comes from and how its columns map to an `Example`.

    Attributes:
        format: one of `FORMATS`.
        path: local file or directory (absolute, or relative to the local data directory or
            the current directory). None: the format's default local copy, else the Hub.
        hub_id: HuggingFace dataset id; defaults to the format's canonical id.
        split: dataset split to read (Hub) or, for Spider directories, which file (``train``
            = ``train_spider.json(l)``, ``dev``, ``train_others``, ``test``). None: ``train``,
            except that a folder holding a single rows file reads that file.
        use: ``split`` (the rows go through the ratio split) or ``train`` / ``valid`` / ``test``
            (every row goes to that split; see `dataset_utils.subsets.assign_splits`).
        columns: for ``custom`` (or to override): mapping of ``question``/``context``/``sql``
            (and optionally ``db_id``, ``complexity``) to the file's column names.
        database_dir: Spider-style only: folder holding ``<db_id>/<db_id>.sqlite``.
        limit: keep only the first ``limit`` rows (applied while reading).
        schema_style: Spider-style only: how the schema read from SQLite is rendered
            (``ddl``, ``compact``, ``columns``; see `dataset_utils.schema`).
        foreign_keys: Spider-style only: ``sqlite`` (the file's declarations), ``tables_json``
            (Spider's ``tables.json`` beside the rows file or the database folder) or ``none``;
            None: the style's default (sqlite for ddl/compact, none for columns).
        sample_values: Spider-style only: show the first N distinct values of every column.
        max_tables: Spider-style only: keep only the N tables most related to the question
            (lexical overlap, plus link tables) when the database has more; None: all.
    """

    format: str
    path: str | None = None
    hub_id: str | None = None
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    database_dir: str | None = None
    limit: int | None = None
    schema_style: str = "ddl"
    use: str = "split"
    foreign_keys: str | None = None
    sample_values: int = 0
    max_tables: int | None = None

    def __post_init__(self) -> None:
        if self.foreign_keys is not None and self.foreign_keys not in FOREIGN_KEY_SOURCES:
            raise UserError(
                f"unknown foreign_keys {self.foreign_keys!r}; expected one of "
                f"{', '.join(FOREIGN_KEY_SOURCES)}"
            )
        if self.sample_values < 0:
            raise UserError(f"sample_values must be >= 0, found {self.sample_values}")
        if self.max_tables is not None and self.max_tables <= 0:
            raise UserError(f"max_tables must be a positive integer, found {self.max_tables}")
        if self.use not in SOURCE_USES:
            raise UserError(
                f"unknown use {self.use!r} for a {self.format} source; expected one of "
                f"{', '.join(SOURCE_USES)}"
            )
        if self.schema_style not in SCHEMA_STYLES:
            raise UserError(
                f"unknown schema_style {self.schema_style!r}; expected one of "
                f"{', '.join(SCHEMA_STYLES)}"
            )
        if self.format not in FORMATS:
            raise UserError(
                f"unknown dataset format {self.format!r}; expected one of "
                f"{', '.join(sorted(FORMATS))}"
            )
        if self.format == "custom" and not {"question", "sql"} <= set(self.columns):
            raise UserError(
                "format 'custom' needs columns mapping at least 'question' and 'sql' "
                f"(found {sorted(self.columns) or 'none'})"
            )
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"dataset limit must be a positive integer, found {self.limit}")


@dataclass
class LoadedSource:
    """Rows of one source plus a fingerprint of where they came from (for caching)."""

    spec: SourceSpec
    examples: list[Example]
    fingerprint: str
    origin: str


def resolve_local_path(path: str, data_dir: Path | None = None) -> Path:
    """Resolve a user-given dataset path, or raise a `UserError` saying what was tried."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        base = data_dir or shared_data_dir()
        if base is not None:
            candidates.append(base / p)
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise UserError(f"dataset path {path!r} does not exist (looked at: {tried})")


def _fingerprint_path(path: Path) -> str:
    """Content hash of a file or of every file under a directory (path, size, bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(str(f.stat().st_size).encode())
        # Hashing multi-GB SQLite files on every run is wasteful; size + mtime stand in for
        # databases, full content for the (small) row files that define the examples.
        if f.suffix in {".sqlite", ".db"}:
            h.update(str(f.stat().st_mtime_ns).encode())
        else:
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def read_table(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read rows from a JSONL / JSON-array / CSV / Parquet file, with clear errors."""
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise UserError(
            f"unsupported file type {suffix or '(none)'} for {path}; expected one of "
            f"{', '.join(sorted(_TABLE_SUFFIXES))}"
        )
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty (0 bytes)")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
        elif suffix == ".csv":
            # utf-8-sig: identical to utf-8 except that it drops the byte-order mark that
            # Excel ("CSV UTF-8") and Notepad write, which would otherwise glue itself to
            # the first column name and report that column as missing.
            with path.open(encoding="utf-8-sig", newline="") as fh:
                rows = []
                for i, row in enumerate(csv.DictReader(fh)):
                    if limit is not None and i >= limit:
                        break
                    rows.append(dict(row))
        elif suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if limit is not None and len(rows) >= limit:
                        break
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(
                            f"{path}:{lineno}: expected a JSON object per line, "
                            f"found {type(row).__name__}"
                        )
                    rows.append(row)
        else:
            with path.open(encoding="utf-8-sig") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict):
                # {"data": [...]} / {"train": [...]} style wrappers.
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise UserError(f"{path}: expected a JSON array of objects")
                data = lists[0]
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON array of objects")
            rows = data[:limit] if limit else data
    except UnicodeDecodeError as e:
        raise UserError(
            f"dataset file {path} is not valid UTF-8 (byte {e.start}: {e.reason}); "
            "re-encode it as UTF-8"
        ) from None
    if not rows:
        raise UserError(f"dataset file {path} has no rows")
    return rows


def _local_data_hint(spec: SourceSpec) -> str:
    """Where the local data was looked for, for an error ("" when no folder is configured)."""
    base, default = shared_data_dir(), FORMATS[spec.format].local_default
    if base is None or not default:
        return ""
    if not base.is_dir():
        return (
            f"; the local data directory {base} does not exist (on a cluster: is the "
            "experiment's bind mount there? cluster/README.md, 'Data')"
        )
    return f"; the local data directory {base} has no {' or '.join(default)}"


def _load_hub(spec: SourceSpec) -> tuple[list[dict[str, Any]], str, str]:
    hub_id = spec.hub_id or FORMATS[spec.format].hub_id
    if hub_id is None:
        raise UserError(f"format {spec.format!r} has no Hub dataset; give data path=<file>")
    if hub_offline():
        where = _local_data_hint(spec)
        raise UserError(
            f"dataset {hub_id!r} is not available locally and the HuggingFace Hub is offline "
            f"(HF_HUB_OFFLINE=1){where}. Point the loader at local files: set the source's `path` "
            "(e.g. --set data.sources.0.path=/data/my.jsonl) or TEXT2SQL_DATA=<folder holding "
            f"{' or '.join(FORMATS[spec.format].local_default) or 'your files'}>"
        )
    import datasets

    split = spec.split or "train"
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 - network/auth/missing: all user-facing here
        raise UserError(
            f"could not load {hub_id!r} (split {split!r}) from the HuggingFace Hub: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Point the loader "
            "at local files with the source's `path`, or TEXT2SQL_DATA=<folder>"
        ) from None
    if spec.limit:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return list(ds), f"hub:{hub_id}:{split}:{ds._fingerprint}", f"hub:{hub_id}"


def _spider_rows_file(folder: Path, split: str | None) -> Path | None:
    """The rows file of ``split`` in a Spider-layout folder, or None when there is none.

    No split given: a folder with a single rows file reads it (a dev-only copy, or your own
    rows), else ``train``. A split given explicitly never falls back to another split's file
    (``split: train`` on a dev-only folder would otherwise train on the test set).
    """
    names = _SPIDER_SPLIT_FILES.get(split or "train", (f"{split}.jsonl", f"{split}.json"))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    files = [
        p for p in folder.iterdir() if p.suffix in {".jsonl", ".json"} and p.name != "tables.json"
    ]
    known = {n for ns in _SPIDER_SPLIT_FILES.values() for n in ns}
    if len(files) == 1 and (split is None or files[0].name not in known):
        return files[0]
    return None


def _find_spider_rows_file(folder: Path, split: str | None) -> Path:
    found = _spider_rows_file(folder, split)
    if found is None:
        names = _SPIDER_SPLIT_FILES.get(split or "train", (f"{split}.jsonl", f"{split}.json"))
        raise UserError(
            f"Spider folder {folder} has no rows file for split {split or 'train'!r} "
            f"(expected one of {', '.join(names)})"
        )
    return found


def _local_default(spec: SourceSpec, base: Path) -> Path | None:
    """The first of the format's default folders that exists (and, for Spider, holds the
    requested split); else the first that exists, so that its error names what is missing."""
    existing = [base / c for c in FORMATS[spec.format].local_default if (base / c).exists()]
    if spec.format == "spider":
        for candidate in existing:
            if candidate.is_dir() and _spider_rows_file(candidate, spec.split) is not None:
                return candidate.resolve()
    return existing[0].resolve() if existing else None


def _coerce_text(value: Any, *, column: str, row_no: int, origin: str, required: bool) -> str:
    if value is None:
        if required:
            raise UserError(f"{origin}: row {row_no}: column {column!r} is null")
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{origin}: row {row_no}: column {column!r} must be a string, "
            f"found {type(value).__name__} ({value!r:.40})"
        )
    text = value.strip()
    if required and not text:
        raise UserError(f"{origin}: row {row_no}: column {column!r} is empty")
    return text


def _check_columns(
    rows: list[dict[str, Any]], needed: Iterable[str], origin: str, fmt: str
) -> None:
    present = set(rows[0].keys())
    missing = [c for c in needed if c not in present]
    if missing:
        raise UserError(
            f"{origin}: missing column(s) {', '.join(repr(c) for c in missing)} for format "
            f"{fmt!r}; found columns: {', '.join(sorted(present))}"
        )


def _normalize(
    rows: list[dict[str, Any]],
    spec: SourceSpec,
    origin: str,
    database_dir: Path | None,
    tables_json: Path | None = None,
) -> Iterator[Example]:
    info = FORMATS[spec.format]
    cols = {
        "question": info.question,
        "context": info.context,
        "sql": info.sql,
        "db_id": "db_id" if spec.format == "spider" else None,
        "complexity": "sql_complexity" if spec.format == "gretel" else None,
        **spec.columns,
    }
    if spec.format == "custom" and "context" not in spec.columns and "context" not in rows[0]:
        # `custom` only has to map question and sql (SourceSpec checks that); without a mapped
        # or literal "context" column the rows simply carry no schema.
        cols["context"] = None
    needed = [c for key, c in cols.items() if c and key in {"question", "sql", "context", "db_id"}]
    _check_columns(rows, needed, origin, spec.format)
    source_name = spec.format if spec.format != "custom" else Path(origin).stem
    for i, row in enumerate(rows, 1):
        question = _coerce_text(
            row.get(cols["question"]),
            column=cols["question"],
            row_no=i,
            origin=origin,
            required=True,
        )
        sql = _coerce_text(
            row.get(cols["sql"]), column=cols["sql"], row_no=i, origin=origin, required=True
        )
        db_id = db_path = None
        if cols["db_id"]:
            db_id = _coerce_text(
                row.get(cols["db_id"]), column=cols["db_id"], row_no=i, origin=origin, required=True
            )
        if cols["context"]:
            context = _coerce_text(
                row.get(cols["context"]),
                column=cols["context"],
                row_no=i,
                origin=origin,
                required=spec.format != "custom",
            )
        else:
            context = ""
        if db_id is not None and database_dir is not None:
            candidate = database_dir / db_id / f"{db_id}.sqlite"
            if not candidate.is_file():
                raise UserError(f"{origin}: row {i}: database {db_id!r} not found at {candidate}")
            db_path = str(candidate)
            if not context:
                keep = (
                    relevant_tables(db_path, question, spec.max_tables)
                    if spec.max_tables is not None
                    else None
                )
                try:
                    context = schema_from_sqlite(
                        db_path,
                        spec.schema_style,
                        foreign_keys=spec.foreign_keys,
                        tables_json=str(tables_json) if tables_json else None,
                        db_id=db_id,
                        sample_values_per_column=spec.sample_values,
                        keep_tables=keep,
                    )
                except KeyError as e:  # the database is not in tables.json
                    raise UserError(f"{origin}: row {i}: {e.args[0]}") from None
        elif db_id is not None and not context:
            raise UserError(
                f"{origin}: Spider-style rows need their SQLite databases; set database_dir "
                "to the folder holding <db_id>/<db_id>.sqlite"
            )
        complexity = row.get(cols["complexity"]) if cols["complexity"] else None
        extra = {k: row[k] for k in info.extras if k in row and row[k] is not None}
        yield Example(
            question=question,
            context=context,
            sql=sql,
            source=source_name,
            db_id=db_id,
            db_path=db_path,
            complexity=str(complexity) if complexity is not None else None,
            instruction=question if spec.format == "clinton" else "",
            extra=extra,
        )


def load_source(spec: SourceSpec, data_dir: Path | None = None) -> LoadedSource:
    """Load one source into normalized examples (see the module docstring for resolution)."""
    base = data_dir or shared_data_dir()
    local: Path | None = None
    if spec.path:
        local = resolve_local_path(spec.path, base)
    elif spec.hub_id is None and base is not None:
        local = _local_default(spec, base)
    if local is None and spec.path is None and spec.hub_id is None:
        # No local copy: a dataset whose Hub copy is incomplete (Spider has no databases
        # there) comes from its official release archive, fetched once into the cache.

        official = downloads.for_format(spec.format)
        if official is not None:
            local = downloads.fetched_path(official)
            if local is None and hub_offline():
                first = next(iter(FORMATS[spec.format].local_default), None)
                raise UserError(
                    f"dataset {spec.format!r}{_local_data_hint(spec)}. "
                    + downloads.offline_message(official, first)
                )
            local = local or downloads.fetch(official.name)

    database_dir = Path(spec.database_dir).expanduser() if spec.database_dir else None
    if database_dir is not None and not database_dir.is_absolute():
        database_dir = resolve_local_path(spec.database_dir or "", base)
    if local is not None:
        rows_file = local
        if local.is_dir():
            if spec.format == "spider":
                rows_file = _find_spider_rows_file(local, spec.split)
                if database_dir is None and (local / "database").is_dir():
                    database_dir = local / "database"
            else:
                files = sorted(p for p in local.iterdir() if p.suffix.lower() in _TABLE_SUFFIXES)
                if len(files) != 1:
                    raise UserError(
                        f"dataset folder {local} must hold exactly one data file "
                        f"(.jsonl/.json/.csv/.parquet); found {len(files)}"
                    )
                rows_file = files[0]
        rows = read_table(rows_file, spec.limit)
        fingerprint = _fingerprint_path(rows_file)
        if database_dir is not None:
            fingerprint += _fingerprint_path(database_dir)
        origin = str(rows_file)
    else:
        rows, fingerprint, origin = _load_hub(spec)
    if spec.format == "spider" and database_dir is None:
        raise UserError(
            f"{origin}: Spider-style rows need their SQLite databases; set database_dir to the "
            "folder holding <db_id>/<db_id>.sqlite"
        )
    tables_json = None
    if spec.foreign_keys == "tables_json":
        tables_json = _find_tables_json(local, database_dir, origin)
        fingerprint += _fingerprint_path(tables_json)
    examples = list(_normalize(rows, spec, origin, database_dir, tables_json))
    digest = hashlib.sha256(
        (fingerprint + json.dumps(spec.__dict__, sort_keys=True, default=str)).encode()
    ).hexdigest()[:16]
    return LoadedSource(spec=spec, examples=examples, fingerprint=digest, origin=origin)


def _find_tables_json(local: Path | None, database_dir: Path | None, origin: str) -> Path:
    """Spider's ``tables.json``: beside the rows file (or in the folder), else beside
    ``database/``."""
    candidates = []
    if local is not None:
        candidates.append((local if local.is_dir() else local.parent) / "tables.json")
    if database_dir is not None:
        candidates.append(database_dir.parent / "tables.json")
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates) or "nowhere (no local folder)"
    raise UserError(
        f"{origin}: foreign_keys: tables_json needs Spider's tables.json (looked at: {tried})"
    )


def env_data_hint() -> str:
    """One line describing where local data is looked for (for messages and --help)."""
    base = shared_data_dir()
    return (
        f"local data directory: {base}"
        if base
        else (
            "no local data directory (set TEXT2SQL_DATA or pass a path); "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}"
        )
    )
