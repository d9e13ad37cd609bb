"""The stand-in agent: runs one task container as a Determined agent would, without Docker.

A container is a process tree in its own PID, mount and network namespaces (``unshare``, so
this needs root, as the agent's Docker does), started by `container_init` as its PID 1:
private ``/run/determined`` and ``/tmp``, the experiment's bind mounts, shared_fs checkpoint
storage at ``/determined_shared_fs``, a private loopback with the master reachable at the same
``DET_MASTER`` URL. The environment is what the agent and master give a trial (``DET_*``,
``task_container_defaults`` and the experiment's ``environment_variables``), on top of a bare
image environment whose ``python3`` is the prepared virtualenv (it stands in for the task image).

The container's stdout/stderr lines go to ``on_line`` (the master's task logs) and to
``<root>/output.log`` (with the time and o/e for stdout/stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE_ENV_KEYS = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TERM")


def unshare_problem() -> str | None:
    """Why containers cannot start on this machine (None when they can)."""
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is missing"
    if os.geteuid() != 0:
        return "starting a task container needs root (mount and network namespaces)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--mount", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"`unshare` cannot create namespaces here: {probe.stderr.strip()}"
    return None


def image_environment() -> dict[str, str]:
    """The environment a task image gives its processes: the prepared virtualenv's interpreter
    first on PATH (it is the image's ``python3``), no variables of the test process itself."""
    env = {k: os.environ[k] for k in IMAGE_ENV_KEYS if k in os.environ}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def _paths_to_keep() -> list[str]:
    """Host paths the container must see although its /tmp is private: the Python install."""
    paths = {sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent)}
    home = os.environ.get("HOME")
    if home:
        paths.add(home)
    return sorted(paths)


class Container:
    def __init__(
        self,
        root: Path,
        *,
        env: dict[str, str],
        bind_mounts: Iterable[dict[str, Any]],
        shared_fs: str | None,
        master_port: int,
        master_socket: Path,
        on_line: Callable[[str, str], None],
    ) -> None:
        self.root = root
        self.on_line = on_line
        run_dir = root / "run"
        for sub in ("workdir", "train", "info"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        entrypoint = run_dir / "train" / "entrypoint.sh"
        shutil.copy(HERE / "entrypoint.sh", entrypoint)
        entrypoint.chmod(0o755)
        self.spec = {
            "run_dir": str(run_dir),
            "tmp_dir": str(root / "tmp"),
            "keep": [*_paths_to_keep(), str(master_socket.parent)],
            "bind_mounts": [
                {
                    "host_path": m["host_path"],
                    "container_path": m["container_path"],
                    "read_only": bool(m.get("read_only", False)),
                }
                for m in bind_mounts
            ],
            "shared_fs": shared_fs,
            "master_port": master_port,
            "master_socket": str(master_socket),
            "command": ["/run/determined/train/entrypoint.sh"],
            "env": env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._log = (root / "output.log").open("a", encoding="utf-8")
        self._log_lock = threading.Lock()

    def start(self) -> None:
        spec_path = self.root / "spec.json"
        spec_path.write_text(json.dumps(self.spec, indent=1))
        cmd = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--kill-child",
            sys.executable,
            str(HERE / "container_init.py"),
            str(spec_path),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=image_environment(),
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, kind in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            t = threading.Thread(target=self._pump, args=(stream, kind), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, stream: Any, kind: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self._log_lock:
                self._log.write(f"{time.strftime('%H:%M:%S')} {kind[3]} {line}")
                self._log.flush()
            self.on_line(kind, line)

    def wait(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)
        self._log.close()
        return rc

    def _init_pid(self) -> int | None:
        """Host pid of the container's PID 1 (the child ``unshare --fork`` started)."""
        if self.proc is None:
            return None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            pids = children.read_text().split()
            return int(pids[0]) if pids else None
        return None

    def terminate(self) -> None:
        """SIGTERM to the container's PID 1, as ``docker stop`` sends it."""
        pid = self._init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def kill(self, grace_s: float = 0.0) -> None:
        """SIGKILL the container (after ``grace_s`` seconds of SIGTERM, if given)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if grace_s > 0:
            self.terminate()
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.1)
        # unshare --kill-child: its death SIGKILLs PID 1, and with it the whole namespace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
