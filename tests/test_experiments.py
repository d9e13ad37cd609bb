"""Every Determined experiment YAML under experiments/ is tested code.

One parametrized test loads each experiment (recursively; ``ds_configs/`` and ``accelerate/``
hold launcher configs, not experiments) the way ``text2sql validate`` and the cluster wiring
do: Determined's own expconf JSON Schemas (``cluster.expconf``, from ``../shared``), the
trainer's hyperparameter dataclasses (``trainer.config``, which also lets
``transformers.TrainingArguments`` validate ``training_args``), and a searcher metric the
trainer reports (``trainer.experiment.VALIDATION_METRICS``). Search spaces are resolved into
the concrete trials the master would run, and each of those must parse too. The DeepSpeed
JSON configs and accelerate launcher configs the experiments and docs point at are checked
with the loaders that will read them; the context directory with Determined's own packer and
``.detignore`` rules; ``startup-hook.sh`` under a stand-in for the image's Python.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_experiments.py -q``
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.config import parse_hyperparameters
from trainer.experiment import GENERATION_METRICS, VALIDATION_METRICS, load_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
DS_CONFIGS = EXPERIMENTS / "ds_configs"
ACCELERATE = EXPERIMENTS / "accelerate"
LAUNCHER_DIRS = {DS_CONFIGS, ACCELERATE}
SEARCH_TYPES = {"const", "categorical", "int", "double", "log"}
# What every experiment that runs on the GPU pool must do (the cluster conventions in
# cluster/README.md): Determined's launchers, the shared scratch dir, evaluation by steps.
CLUSTER_OUTPUT_DIR = "/tmp/llm_finetuning"


def _experiment_files() -> list[Path]:
    return sorted(
        p for p in EXPERIMENTS.rglob("*.y*ml") if not any(d in p.parents for d in LAUNCHER_DIRS)
    )


def _rel(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


@pytest.fixture
def expconf(determined_ref_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point cluster.expconf at Determined's schemas; run from the context dir, as on a cluster.

    Paths inside an experiment (training_args.deepspeed) are relative to the Determined
    context directory -- the repo root, the task's working directory on the cluster.
    """
    schemas = determined_ref_dir / "expconf-v0"
    monkeypatch.setenv("TEXT2SQL_EXPCONF_DIR", str(schemas))
    monkeypatch.chdir(REPO_ROOT)
    return schemas


# --------------------------------------------------------------------------------------------
# Search spaces, resolved as the master does.


def _is_space(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") in SEARCH_TYPES


Leaf = tuple[tuple[str, ...], dict[str, Any]]


def _leaves(hparams: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """(path, search space) for every search space, however deeply nested."""
    for key, value in hparams.items():
        if _is_space(value):
            yield (*prefix, key), value
        elif isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))


def _candidates(space: dict[str, Any], grid: bool) -> list[Any]:
    """The values a trial can get: every grid point, else the range's ends and categories."""
    kind = space["type"]
    if kind == "const":
        return [space["val"]]
    if kind == "categorical":
        return list(space["vals"])
    lo, hi = space["minval"], space["maxval"]
    if kind == "log":
        base = float(space.get("base", 10))
        lo, hi = base**lo, base**hi
    if grid:
        count = int(space["count"])
        if kind == "int":
            return sorted({round(lo + (hi - lo) * i / max(count - 1, 1)) for i in range(count)})
        return [lo + (hi - lo) * i / max(count - 1, 1) for i in range(count)]
    return [lo, hi]


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def concrete_trials(hparams: dict[str, Any], searcher: str) -> list[dict[str, Any]]:
    """Hyperparameters of the trials to check.

    ``grid``: exactly the grid the master enumerates (the cross product). Otherwise (random,
    ASHA): every category and both ends of every range, one dimension at a time from the
    first value of all the others -- the values any sampled trial is drawn between.
    """
    leaves = list(_leaves(hparams))
    if not leaves:
        return [hparams]
    grid = searcher == "grid"
    choices = [_candidates(space, grid) for _, space in leaves]
    if grid:
        combos = list(itertools.product(*choices))
    else:
        first = [c[0] for c in choices]
        combos = [tuple(first)] + [
            tuple(v if j == i else first[j] for j in range(len(first)))
            for i, c in enumerate(choices)
            for v in c[1:]
        ]
    trials = []
    for combo in combos:
        trial = copy.deepcopy(hparams)
        for (path, _), value in zip(leaves, combo, strict=True):
            _set(trial, path, value)
        trials.append(trial)
    return trials


# --------------------------------------------------------------------------------------------
# The one test per experiment.


@pytest.mark.parametrize("path", _experiment_files(), ids=_rel)
def test_experiment(path: Path, expconf: Path) -> None:
    # Determined's schema, the trainer's dataclasses, TrainingArguments, searcher checks.
    exp = load_experiment(path)
    config, hp = exp.config, exp.hparams
    searcher = config["searcher"]

    # The searcher optimizes something the trainer actually reports, in the right direction
    # (a wrong smaller_is_better makes ASHA promote the worst trials and GC keep the worst
    # checkpoints).
    assert searcher["metric"] in VALIDATION_METRICS
    assert searcher.get("smaller_is_better", True) is (searcher["metric"] == "eval_loss")
    if searcher["metric"] in GENERATION_METRICS:
        assert hp.eval.generation_samples > 0
    assert hp.training_args.get("eval_strategy") == "steps"

    # Deliberate fault tolerance and checkpoint GC, never the cluster's defaults by accident.
    assert isinstance(config.get("max_restarts"), int) and config["max_restarts"] >= 0
    storage = config["checkpoint_storage"]
    for key in ("save_trial_best", "save_trial_latest", "save_experiment_best"):
        assert isinstance(storage.get(key), int), f"checkpoint_storage.{key} is not set"
    # A trial that cannot keep its latest checkpoint cannot resume after preemption.
    assert storage["save_trial_latest"] >= 1

    # Launcher and DeepSpeed config agree, and the config is where the trial will look.
    ds = hp.training_args.get("deepspeed")
    assert (exp.launcher == "deepspeed") == (ds is not None), (exp.launcher, ds)
    if ds is not None:
        ds_path = exp.context_dir / ds
        assert ds_path.parent == DS_CONFIGS and ds_path.is_file(), ds
        json.loads(ds_path.read_text())
    if exp.slots > 1:
        assert exp.launcher != "none", "several slots need a distributed launcher"

    if config["resources"].get("resource_pool") == "gpu-pool":
        assert exp.launcher in ("torch_distributed", "deepspeed")
        assert hp.training_args["output_dir"] == CLUSTER_OUTPUT_DIR
        assert config["environment"]["image"]["cuda"]

    # Searcher lengths in optimizer steps agree with the trainer's.
    if searcher["name"] in ("adaptive_asha", "async_halving"):
        assert searcher["time_metric"] == "batches"
        assert searcher["max_time"] == hp.training_args["max_steps"]
        rungs = searcher.get("max_rungs", 5)
        first_rung = searcher["max_time"] / searcher.get("divisor", 4) ** (rungs - 1)
        # Every rung decides on a fresh evaluation, not one from long before it.
        assert hp.training_args["eval_steps"] <= math.floor(first_rung)
    if isinstance(searcher.get("max_length"), dict):
        assert searcher["max_length"].get("batches") == hp.training_args["max_steps"]

    # Every trial the search can produce is a valid trial.
    raw = config.get("hyperparameters") or {}
    trials = concrete_trials(raw, searcher["name"])
    for trial in trials:
        assert not list(_leaves(trial))
        parse_hyperparameters(trial)
    if searcher["name"] == "grid":
        sizes = [len(_candidates(space, True)) for _, space in _leaves(raw)]
        assert len(trials) == math.prod(sizes) > 1
    elif searcher["name"] != "single":
        assert searcher.get("max_trials", 0) > 1 and len(trials) > 1


def test_every_file_under_experiments_is_checked() -> None:
    """Nothing under experiments/ escapes the tests above and below."""
    checked = set(_experiment_files()) | set(_ds_configs()) | set(_accelerate_configs())
    stray = [_rel(p) for p in EXPERIMENTS.rglob("*") if p.is_file() and p not in checked]
    assert not stray, f"untested files under experiments/: {stray}"
    assert len(_experiment_files()) >= 9


def test_search_spaces_resolve_to_the_expected_trials(expconf: Path) -> None:
    grid = load_experiment(EXPERIMENTS / "lora-grid-search.yaml")
    trials = concrete_trials(grid.config["hyperparameters"], "grid")
    pairs = {(t["lora"]["r"], t["lora"]["alpha"]) for t in trials}
    assert pairs == set(itertools.product([8, 16, 32], [16, 32, 64]))

    asha = load_experiment(EXPERIMENTS / "lora-asha.yaml")
    lrs = {
        t["training_args"]["learning_rate"]
        for t in concrete_trials(asha.config["hyperparameters"], "adaptive_asha")
    }
    assert min(lrs) == pytest.approx(10**-4.5) and max(lrs) == pytest.approx(1e-3)
    # The local runner's pick (text2sql run) is one point of the space.
    assert asha.resolved_hparams["lora"]["r"] == 8
    assert 10**-4.5 <= asha.resolved_hparams["training_args"]["learning_rate"] <= 1e-3


# --------------------------------------------------------------------------------------------
# Launcher configs.


def _ds_configs() -> list[Path]:
    return sorted(DS_CONFIGS.glob("*"))


def _accelerate_configs() -> list[Path]:
    return sorted(ACCELERATE.glob("*"))


@pytest.mark.parametrize("path", _ds_configs(), ids=_rel)
def test_deepspeed_config(path: Path) -> None:
    from transformers.integrations import HfDeepSpeedConfig

    assert path.suffix == ".json"
    config = json.loads(path.read_text())
    ds = HfDeepSpeedConfig(copy.deepcopy(config))  # what the Trainer's integration reads
    stage = int(path.stem.removeprefix("zero")[0])
    assert ds.get_value("zero_optimization.stage") == stage
    assert ds.is_zero3() == (stage == 3)
    assert ds.is_offload() == path.stem.endswith("_offload")
    # Batch sizes, accumulation and clipping come from training_args, never from two places.
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:
        # Otherwise save_model writes no usable weights and every checkpoint needs DeepSpeed.
        assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save")
    if ds.is_offload():
        # An offloaded optimizer must be DeepSpeed's own (DeepSpeedCPUAdam), not the Trainer's.
        assert config["optimizer"]["params"]["lr"] == "auto"


@pytest.mark.parametrize("path", _accelerate_configs(), ids=_rel)
def test_accelerate_config(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    assert isinstance(yaml.safe_load(path.read_text()), dict)
    monkeypatch.chdir(REPO_ROOT)  # the documented commands run from the repo root
    config = load_config_from_file(str(path))  # accelerate's own parser; unknown keys fail
    assert config.num_processes == 2 and config.num_machines == 1
    if config.distributed_type == "DEEPSPEED":
        ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
        assert (REPO_ROOT / ds_file).parent == DS_CONFIGS and (REPO_ROOT / ds_file).is_file()
    else:
        assert config.distributed_type == "MULTI_GPU"
        assert config.mixed_precision == "bf16"


# --------------------------------------------------------------------------------------------
# What `det e create <yaml> .` uploads, and what every task container runs first.


def test_context_directory_fits_and_carries_the_trial() -> None:
    """What Determined's own packer would upload from this checkout, and its ignore rules."""
    from determined.common import constants, context, detignore

    uploaded = context.read_v1_context(REPO_ROOT)  # raises past Determined's size limit
    files = {f.path for f in uploaded}
    for needed in (
        "startup-hook.sh",
        "pyproject.toml",
        "trainer/finetune.py",
        "experiments/ds_configs/zero3.json",
        "experiments/lora-asha.yaml",
    ):
        assert needed in files, needed
    assert not [f for f in files if f.startswith((".git/", "runs/", "tests/"))]
    assert sum(len(f.content) for f in uploaded) < constants.MAX_CONTEXT_SIZE

    spec = detignore._build_detignore_pathspec(REPO_ROOT)
    for ignored in (
        "runs/exp/trial-1/checkpoints/x/model.safetensors",
        "mlruns/0/meta.yaml",
        ".venv/lib/site.py",
        "data/spider/train.json",
        "mlflow.db",
        "experiments/checkpoint-7/optimizer.pt",
        "weights.gguf",
        ".git/HEAD",
    ):
        assert spec.match_file(ignored), ignored
    for kept in ("dataset_utils/data_sources.py", "evaluation/data/x.py", "cluster/README.md"):
        assert not spec.match_file(kept), kept


HOOK = REPO_ROOT / "startup-hook.sh"
# Stands in for the image's python3: pip and the installed torch's version are recorded/faked,
# everything else (the hook's Python snippets reading pyproject.toml and the installed
# packages) runs on a bare interpreter, an image that has none of the pins.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "pip ${*:3}" >>"$HOOK_LOG"
    for ((i = 1; i <= $#; i++)); do
        if [ "${!i}" = "--constraint" ]; then j=$((i + 1)); cat "${!j}" >>"$HOOK_LOG"; fi
    done
    exit 0
fi
if [ "$1" = "-c" ] && [[ "$2" == *'version("torch")'* ]]; then
    [ -n "$FAKE_TORCH" ] && echo "$FAKE_TORCH" && exit 0
    exit 1
fi
exec "$REAL_PYTHON" "$@"
"""


def _run_hook(tmp_path: Path, torch_version: str) -> tuple[int, str, str]:
    import os
    import subprocess

    from tests.test_cpu_job_container import bare_python

    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "hook.log"
    env = {
        **os.environ,
        "DET_PYTHON_EXECUTABLE": str(fake),
        "HOOK_LOG": str(log),
        "FAKE_TORCH": torch_version,
        "REAL_PYTHON": bare_python(),
        # No nvidia-smi: a CPU container.
        "PATH": os.pathsep.join(["/usr/bin", "/bin"]),
    }
    # As Determined's entrypoint does: `set -e`, then source the hook from the context dir.
    proc = subprocess.run(
        ["bash", "-c", f"set -e; source {HOOK}; echo entrypoint-continues"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else ""


def _torch_pin() -> str:
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("torch=="))


def test_startup_hook_keeps_the_images_torch(tmp_path: Path) -> None:
    image_torch = f"{_torch_pin()}+cu128"
    rc, out, log = _run_hook(tmp_path, image_torch)
    assert rc == 0, out
    assert "entrypoint-continues" in out  # sourced: the entrypoint goes on afterwards
    pip_calls = [line for line in log.splitlines() if line.startswith("pip ")]
    # One install, of the project, constrained to the torch already there.
    assert len(pip_calls) == 1, pip_calls
    assert pip_calls[0].startswith("pip install --no-cache-dir --constraint ")
    assert pip_calls[0].endswith(" --editable .")
    assert f"torch=={image_torch}" in log.splitlines()


def test_startup_hook_refuses_a_different_torch(tmp_path: Path) -> None:
    rc, out, log = _run_hook(tmp_path, "2.3.0a0+40ec155e58.nv24.03")
    assert rc != 0 and "entrypoint-continues" not in out
    assert "refusing to replace the image's torch" in out
    assert log == ""  # nothing installed, nothing downloaded


def test_startup_hook_installs_cpu_torch_where_there_is_none(tmp_path: Path) -> None:
    rc, out, log = _run_hook(tmp_path, "")
    assert rc == 0, out
    pip_calls = [line for line in log.splitlines() if line.startswith("pip ")]
    assert pip_calls[0] == (
        "pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "
        f"torch=={_torch_pin()}"
    )
    assert pip_calls[1].endswith("--editable .")
