"""Every command in README.md runs as written.

Fast tier: every fenced ``bash`` block parses (``bash -n``), and every command in it exists
with the flags it is given -- ``text2sql`` through our own argument parser, ``mlflow`` through
its click commands, the rest on PATH; repository paths exist; the serving requests use only
fields and params of the served model's signature; the model URI names what the main job
registers, in the tracking store ``text2sql run`` writes. New blocks are covered as they are
added (a block that cannot run in a test says why in a ``readme-test`` marker).

Slow tier: the blocks run in order with bash in a fresh copy of the repository (main job
capped, see `tests.readme_blocks`), servers they start in the background included; the
serving block must answer a ``schema`` request with SQL and a ``db`` request with rows.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import readme_blocks as rb
from tests.conftest import REPO_ROOT, SHARED

README = REPO_ROOT / "README.md"
BLOCKS = rb.blocks(README)
SKIP_PATH_PREFIXES = ("runs/", "~", "$")  # written by an earlier command, or the user's own
SHELL_BUILTINS = {".", "source", "export", "cd", "true"}


def which(prog: str) -> str | None:
    """On PATH, or beside this interpreter (the venv's scripts when it is not activated)."""
    beside = Path(sys.executable).parent / prog
    return shutil.which(prog) or (str(beside) if beside.is_file() else None)


def _ids() -> list[str]:
    return [f"block{b.index}-line{b.line}-{b.mode}" for b in BLOCKS]


def registered_model_name() -> str:
    cfg = yaml.safe_load((REPO_ROOT / rb.MAIN_JOB).read_text())
    mlflow_cfg = (cfg.get("hyperparameters") or {}).get("mlflow") or {}
    return str(mlflow_cfg.get("registered_model_name") or cfg["name"])


def test_readme_has_blocks_with_known_markers() -> None:
    assert len(BLOCKS) >= 5
    for b in BLOCKS:
        assert b.mode in rb.MODES, f"README line {b.line}: unknown readme-test mode {b.mode!r}"
        if b.mode == "static":
            assert b.why, f"README line {b.line}: a static block must say why it is not run"
    assert any(rb.MAIN_JOB in b.text and b.mode == "tiny" for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=_ids())
def test_block_parses_and_every_command_exists(block: rb.Block) -> None:
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert r.returncode == 0, f"README line {block.line}: bash -n: {r.stderr}"
    for argv in rb.simple_commands(block.text):
        _check_command(argv, block)
    if "models:/" in block.text:
        # A registered model resolves only against the store that holds it: MLflow's default
        # (./mlflow.db) is not where `text2sql run` registers.
        assert "MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db" in block.text, (
            f"README line {block.line}: models:/ URI without the tracking store"
        )
    if block.mode == "tiny":
        # The substituted command still runs the main job through `text2sql run`.
        tiny = rb.tiny_command(block.text)
        assert f"text2sql run {rb.MAIN_JOB} --set" in tiny
        assert not any(step in tiny for step in rb.INSTALL_STEPS)


def _check_command(argv: list[str], block: rb.Block) -> None:
    where = f"README line {block.line}: {' '.join(argv)[:120]}"
    prog = argv[0]
    if prog in SHELL_BUILTINS:
        if prog == "export":
            for assignment in argv[1:]:
                name, _, value = assignment.partition("=")
                if name == "MLFLOW_TRACKING_URI":
                    # The store `text2sql run` writes by default (cluster.mirror).
                    assert value == "sqlite:///runs/mlflow.db", where
        return
    if prog == "text2sql":
        _check_text2sql(argv, where)
    elif prog == "mlflow":
        _check_mlflow(argv, where)
    elif prog == "curl":
        _check_curl(argv, block, where)
    elif prog in ("python", "python3.11") and argv[1:3] == ["-m", "pytest"]:
        import tomllib

        markers = {
            m.split(":", 1)[0]
            for m in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
                "ini_options"
            ]["markers"]
        }
        if "-m" in argv[3:]:
            marker = argv[3:][argv[3:].index("-m") + 1]
            assert marker in markers, f"{where}: unknown pytest marker {marker}"
    elif prog in ("python", "python3.11") and argv[1:2] == ["-c"]:
        compile(argv[2], "<readme>", "exec")
    else:
        # python3.11, pip, det (the Determined CLI comes with the project), curl, ...
        assert which(prog), f"{where}: {prog} is not installed"
    _check_paths(argv[1:], where)


def _check_paths(args: list[str], where: str) -> None:
    for arg in args:
        if arg.startswith(SKIP_PATH_PREFIXES) or "://" in arg or arg.startswith("-"):
            continue
        if "/" in arg and arg.rsplit(".", 1)[-1] in {"yaml", "json", "py", "toml", "sh"}:
            matches = glob.glob(str(REPO_ROOT / arg))
            assert matches, f"{where}: {arg} does not exist in the repository"


def _check_text2sql(argv: list[str], where: str) -> None:
    from trainer.cli import build_parser

    args = []
    for a in argv[1:]:
        expanded = sorted(glob.glob(str(REPO_ROOT / a))) if "*" in a else []
        args += [str(Path(p).relative_to(REPO_ROOT)) for p in expanded] or [a]
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: text2sql rejects these arguments (exit {e.code})")
    model = getattr(ns, "model", None)
    if isinstance(model, str) and model.startswith("models:/"):
        assert model.split("/", 1)[1].split("@")[0] == registered_model_name(), where
    for name in ("experiment", "experiments"):
        for path in [getattr(ns, name, None)] if name == "experiment" else getattr(ns, name, []):
            if path:
                assert (REPO_ROOT / path).is_file(), f"{where}: {path} does not exist"


def _check_mlflow(argv: list[str], where: str) -> None:
    import click
    from mlflow.cli import cli

    cmd: click.Command = cli
    rest = argv[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"{where}: mlflow has no command {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for a in rest:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in opts, f"{where}: mlflow option {a} does not exist"
    if "-m" in rest or "--model-uri" in rest:
        uri = rest[rest.index("-m" if "-m" in rest else "--model-uri") + 1]
        assert uri == f"models:/{registered_model_name()}@champion", where


def _check_curl(argv: list[str], block: rb.Block, where: str) -> None:
    from cluster.mlflow_model import signature

    if "-d" not in argv:
        return
    payload = json.loads(argv[argv.index("-d") + 1])
    sig = signature()
    inputs = {c.name for c in sig.inputs.inputs}
    params = {p.name for p in sig.params.params}
    for record in payload.get("dataframe_records", []):
        assert set(record) <= inputs, f"{where}: fields {set(record) - inputs} not in signature"
        assert "question" in record and {"schema", "context", "db"} & set(record), where
    assert set(payload.get("params", {})) <= params, f"{where}: unknown params"
    url = next(a for a in argv[1:] if "/invocations" in a)
    port = url.split(":", 1)[1].split("/", 1)[0]
    assert f"-p {port}" in block.text or f"--port {port}" in block.text, (
        f"{where}: no server started on port {port} in this block"
    )


# ------------------------------------------------------------------------------------------
# Slow: run them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked + untracked, not ignored): a fresh checkout's content."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO_ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def fresh_cache(path: Path) -> Path:
    """An empty TEXT2SQL_CACHE, sharing only the converted embedded model (25 s to redo)."""
    path.mkdir(parents=True, exist_ok=True)
    default = Path(os.environ.get("TEXT2SQL_CACHE") or Path.home() / ".cache" / "text2sql")
    if (default / "models").is_dir():
        (path / "models").symlink_to(default / "models", target_is_directory=True)
    return path


def base_env(repo: Path, cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEXT2SQL_", "MLFLOW_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo),
        TEXT2SQL_CACHE=str(cache),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_block(
    text: str, cwd: Path, env: dict[str, str], log: Path, timeout_s: float
) -> tuple[int, str]:
    """``bash -e -o pipefail -c text`` in its own process group; background servers it starts
    are killed when it ends. Output goes to a file (a pipe would wait for the servers)."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text(errors="replace")


@pytest.mark.slow
def test_every_readme_block_runs_in_a_fresh_copy(tmp_path: Path) -> None:
    from tests.spider_archive import ArchiveServer, build_archive

    shared_data = SHARED / "data"
    if not shared_data.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{shared_data} missing; CI=true")
        pytest.skip(f"{shared_data} not found (the README's main job reads it as local data)")
    repo = copy_repo(tmp_path / "text2sql-finetune")
    env = base_env(repo, fresh_cache(tmp_path / "cache"))
    env["TEXT2SQL_DATA"] = str(shared_data)  # here: the local data, as ../shared beside a clone
    ports = {5000: free_port(), 5001: free_port()}
    archive = build_archive(tmp_path / "archive")
    server = ArchiveServer(archive.path.parent)
    timeout_s = float(os.environ.get("TEXT2SQL_SLOW_TIMEOUT_S", "3600"))
    outputs: dict[int, str] = {}
    try:
        for b in BLOCKS:
            if b.mode == "static":
                continue
            text = rb.with_ports(b.text, ports)
            block_env = dict(env)
            if b.mode == "tiny":
                text = rb.tiny_command(text)
            if b.mode == "archive":
                text = text.replace("~/Downloads/spider_data.zip", str(archive.path))
                block_env.update(
                    TEXT2SQL_DOWNLOAD_BASE=server.url, TEXT2SQL_SPIDER_SHA256=archive.sha256
                )
            t0 = time.monotonic()
            rc, out = run_block(text, repo, block_env, tmp_path / f"block{b.index}.log", timeout_s)
            print(
                f"README block {b.index} (line {b.line}, {b.mode}): rc {rc}, "
                f"{time.monotonic() - t0:.0f} s"
            )
            assert rc == 0, f"README block at line {b.line} failed ({rc}):\n{text}\n{out[-6000:]}"
            outputs[b.index] = out
    finally:
        server.close()

    main = next(b for b in BLOCKS if b.mode == "tiny")
    assert "round trip verified" in outputs[main.index], outputs[main.index][-3000:]
    trial = repo / "runs" / "smollm2-135m-lora-cpu" / "trial-1"
    assert (trial / "curves.png").is_file()
    assert list(trial.glob("evaluation-*/curves.png"))

    serve = next(b for b in BLOCKS if "mlflow models serve" in b.text)
    # curl prints no newline after an answer: two answers may share a line.
    answers = []
    decoder = json.JSONDecoder()
    for line in outputs[serve.index].splitlines():
        at = line.find('{"predictions"')
        while at != -1:
            answer, end = decoder.raw_decode(line, at)
            answers.append(answer)
            at = line.find('{"predictions"', end)
    assert len(answers) == 2, outputs[serve.index][-3000:]
    by_schema, by_db = (a["predictions"][0] for a in answers)
    assert set(by_schema) == {"sql"} and by_schema["sql"].strip()
    assert set(by_db) == {"sql", "columns", "rows", "error"}
    assert by_db["error"] is None, by_db
    assert by_db["rows"], by_db
    print(f"served: {by_schema} / {by_db}")
    ask = [ln for ln in outputs[serve.index].splitlines() if ln.startswith("SQL: ")]
    assert ask, outputs[serve.index][-3000:]
