"""PID 1 of a stand-in task container (run by `tests.cluster.agent` under ``unshare``).

The agent starts this script in fresh PID, mount and network namespaces, as root, with a JSON
spec. It builds what a Determined agent's Docker container gives a trial:

- ``/run/determined`` (the container's run dir: ``workdir/``, ``train/``, ``info/``) and ``/tmp``
  private to the container; host paths that must stay visible (the Python environment standing
  in for the task image, the master's socket) are bound back at the same place;
- the experiment's ``bind_mounts`` (``read_only`` honoured);
- the shared_fs checkpoint storage's ``host_path`` bound at ``/determined_shared_fs``, where the
  harness (``constants.SHARED_FS_CONTAINER_PATH``) reads and writes checkpoints;
- its own loopback network, so fixed ports (torch_distributed's C10D port 29400, DeepSpeed's
  29500) never collide between containers; ``DET_MASTER``'s port on 127.0.0.1 is forwarded to
  the stand-in master's Unix socket.

Then it runs the entrypoint, forwards SIGTERM/SIGINT to it and exits with its status; as PID 1
its exit ends every process left in the container, as ``docker stop`` would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def bind(src: str, dst: str, *, read_only: bool = False) -> None:
    if Path(src).is_dir():
        Path(dst).mkdir(parents=True, exist_ok=True)
    else:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        Path(dst).touch(exist_ok=True)
    run("mount", "--rbind", src, dst)
    if read_only:
        run("mount", "-o", "remount,bind,ro", dst)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def build_filesystem(spec: dict[str, Any]) -> None:
    run_host = spec["run_dir"]
    Path("/run/determined").mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", run_host, "/run/determined")
    # Host /tmp stays reachable at a staging point until everything from it is bound.
    staging = "/run/determined/.host-tmp"
    Path(staging).mkdir(exist_ok=True)
    run("mount", "--rbind", "/tmp", staging)

    def host(path: str) -> str:
        return staging + path[len("/tmp") :] if under(path, "/tmp") else path

    run("mount", "--bind", spec["tmp_dir"], "/tmp")
    for path in spec["keep"]:
        if under(path, "/tmp"):
            bind(host(path), path)
    for m in spec["bind_mounts"]:
        bind(host(m["host_path"]), m["container_path"], read_only=m["read_only"])
    if spec.get("shared_fs"):
        Path("/determined_shared_fs").mkdir(exist_ok=True)
        run("mount", "--bind", host(spec["shared_fs"]), "/determined_shared_fs")
    run("umount", "-l", staging)
    os.rmdir(staging)


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(
            s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)
        )


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def forward_master(port: int, unix_path: str) -> None:
    """127.0.0.1:port inside the container -> the master's Unix socket on the host."""
    server = socket.create_server(("127.0.0.1", port), backlog=64)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(unix_path)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    build_filesystem(spec)
    loopback_up()
    forward_master(spec["master_port"], spec["master_socket"])
    os.chdir("/run/determined/workdir")
    child = subprocess.Popen(spec["command"], env=spec["env"])

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main())
