"""The bad-input table: every malformed config, dataset or CLI argument gets one clear line.

Each case runs the real ``text2sql`` CLI as a subprocess and asserts: a non-zero exit, exactly
one ``error:`` line naming the problem (a substring), no ``Traceback``, and that a run folder
that already existed for the experiment (``runs/tiny/experiment.yaml`` + a finished
``trial-1``) is byte-for-byte untouched and gains no new trial. Every case fails before a
model is loaded; the subprocesses run a few at a time so the table takes about a minute.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]

# Blocks `import bitsandbytes` (and makes find_spec fail) in the child: "not installed",
# without touching the real environment.
BLOCK_BNB = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


@dataclass
class Case:
    id: str
    expect: str  # substring of the one error line
    # Mutates the base experiment (a dict) in place; or None to keep it.
    config: Callable[[dict[str, Any]], Any] | None = None
    raw_yaml: bytes | None = None  # replaces the experiment file entirely
    yaml_edit: Callable[[str], str] | None = None  # edits the experiment file's text
    data_file: tuple[str, bytes] | None = None  # (file name, content) used as the only source
    data_format: str = "sql-create-context"
    argv: list[str] | None = None  # replaces the default `run <exp> ...` arguments
    extra_args: list[str] = field(default_factory=list)
    block_bitsandbytes: bool = False


def hp(d: dict[str, Any]) -> dict[str, Any]:
    return d["hyperparameters"]


def ta(d: dict[str, Any]) -> dict[str, Any]:
    return d["hyperparameters"]["training_args"]


ROW = b'{"question": "How many heads?", "context": "CREATE TABLE head (age INT)", '
ROW += b'"answer": "SELECT COUNT(*) FROM head"}\n'

CASES = [
    # ---- experiment YAML -------------------------------------------------------------------
    Case("yaml-syntax", "is not valid YAML (line 3", raw_yaml=b"name: tiny\nhyperparameters: [\n"),
    Case("yaml-empty", "is empty", raw_yaml=b""),
    Case("yaml-not-mapping", "must be a mapping, found list", raw_yaml=b"- name: tiny\n"),
    Case("yaml-not-utf8", "is not UTF-8 text", raw_yaml=b"name: t\xe9st\n"),
    # PyYAML would keep the last value; `det e create` (ruamel) refuses the file: so do we.
    Case(
        "yaml-duplicate-key-run",
        'found duplicate key "learning_rate" with value "0.5" (original value: "0.005")',
        yaml_edit=lambda t: t.replace(
            "    learning_rate: 0.005\n", "    learning_rate: 0.005\n    learning_rate: 0.5\n", 1
        ),
    ),
    Case(
        "yaml-duplicate-key-validate",
        'found duplicate key "learning_rate"',
        yaml_edit=lambda t: t.replace(
            "    learning_rate: 0.005\n", "    learning_rate: 0.005\n    learning_rate: 0.5\n", 1
        ),
        argv=["validate", "exp.yaml"],
    ),
    Case(
        "unknown-hparam-key",
        "unknown key(s) 'lerning_rate'; valid keys: model, method, lora",
        config=lambda d: hp(d).update(lerning_rate=0.1),
    ),
    Case(
        "unknown-lora-key",
        "hyperparameters.lora: unknown key(s) 'rank'; valid keys: r, alpha",
        config=lambda d: hp(d)["lora"].update(rank=8),
    ),
    Case(
        "unknown-training-arg",
        "'learning_rte' (did you mean 'learning_rate'?)",
        config=lambda d: ta(d).update(learning_rte=0.1),
    ),
    Case(
        "wrong-type-int",
        "hyperparameters.lora.r: expected an integer, found 'sixteen'",
        config=lambda d: hp(d)["lora"].update(r="sixteen"),
    ),
    Case(
        "wrong-type-bool",
        "hyperparameters.efficiency.packing: expected true or false",
        config=lambda d: hp(d)["efficiency"].update(packing="sometimes"),
    ),
    Case(
        "token-budget-negative",
        "hyperparameters.efficiency.max_tokens_per_batch must be positive (or null), found -1",
        config=lambda d: hp(d)["efficiency"].update(max_tokens_per_batch=-1),
    ),
    Case(
        "token-budget-below-max-length",
        "hyperparameters.efficiency.max_tokens_per_batch (100) is below data.max_length (384)",
        config=lambda d: hp(d)["efficiency"].update(max_tokens_per_batch=100),
    ),
    Case(
        "wrong-type-section",
        "hyperparameters.data: expected a mapping, found list",
        config=lambda d: hp(d).update(data=["spider"]),
    ),
    Case(
        "negative-steps",
        "max_steps must be positive, found -5",
        config=lambda d: ta(d).update(max_steps=-5),
    ),
    Case(
        "negative-learning-rate",
        "learning_rate must be >= 0, found -0.001",
        config=lambda d: ta(d).update(learning_rate=-0.001),
    ),
    # Every training_args value is checked against its TrainingArguments field's type before
    # anything is written (it used to make a trial folder, then fail in the optimizer).
    Case(
        "training-arg-not-a-number",
        "training_args.learning_rate: expected a number, found 'fast'",
        config=lambda d: ta(d).update(learning_rate="fast"),
    ),
    Case(
        "cli-set-training-arg-not-a-number",
        "training_args.learning_rate: expected a number, found 'fast'",
        extra_args=["--set", "training_args.learning_rate=fast"],
    ),
    Case(
        "training-arg-not-an-integer",
        "training_args.per_device_train_batch_size: expected an integer, found 'four'",
        config=lambda d: ta(d).update(per_device_train_batch_size="four"),
    ),
    Case(
        "training-arg-not-a-bool",
        "training_args.dataloader_pin_memory: expected true or false, found 'maybe'",
        config=lambda d: ta(d).update(dataloader_pin_memory="maybe"),
    ),
    Case(
        "reserved-training-arg",
        "training_args.gradient_checkpointing: set activation_checkpointing instead",
        config=lambda d: ta(d).update(gradient_checkpointing=True),
    ),
    Case(
        "missing-model-path",
        "model.name_or_path: local model folder /nonexistent/tiny-model does not exist",
        config=lambda d: hp(d)["model"].update(name_or_path="/nonexistent/tiny-model"),
    ),
    Case(
        "model-not-cached-offline",
        "model 'nobody-xyz/not-a-model' is not in the local HuggingFace cache",
        config=lambda d: hp(d)["model"].update(name_or_path="nobody-xyz/not-a-model"),
    ),
    Case(
        "unknown-embedded-model",
        "unknown embedded model 'embedded:gpt-17'; expected one of embedded:smollm2",
        config=lambda d: hp(d)["model"].update(name_or_path="embedded:gpt-17"),
    ),
    Case(
        "lora-on-full-finetune",
        "LoRA options given but method is 'full'",
        config=lambda d: hp(d).update(method="full"),
    ),
    Case(
        "quantization-on-lora",
        "4-bit options only apply to method 'qlora'",
        config=lambda d: hp(d).update(quantization={"quant_type": "nf4"}),
    ),
    Case(
        "qlora-without-bitsandbytes",
        "method 'qlora' needs bitsandbytes",
        config=lambda d: hp(d).update(method="qlora"),
        block_bitsandbytes=True,
    ),
    Case(
        "unknown-method",
        "method: unknown 'dpo'; expected one of full, lora, qlora",
        config=lambda d: hp(d).update(method="dpo"),
    ),
    Case(
        "slots-exceed-batch",
        "slots_per_trial=8 x per_device_train_batch_size=4 = 32 exceeds data.number_of_samples=10",
        config=lambda d: (
            d["resources"].update(slots_per_trial=8),
            hp(d)["data"].update(number_of_samples=10),
        ),
    ),
    Case(
        "bad-searcher-metric",
        "searcher.metric 'eval_acc' is never reported by the trainer; choose one of eval_loss",
        config=lambda d: d["searcher"].update(metric="eval_acc"),
    ),
    Case(
        "generation-metric-without-generation",
        "searcher.metric 'eval_execution_accuracy' needs eval.generation_samples > 0",
        config=lambda d: hp(d)["eval"].update(generation_samples=0),
    ),
    Case(
        "guided-decoding-without-beams",
        "execution_guided needs candidates to choose from: set num_beams >= 2",
        config=lambda d: hp(d)["eval"].update(decoding={"execution_guided": True}),
    ),
    Case(
        "decoding-unknown-key",
        "hyperparameters.eval.validation_decoding: unknown key(s) 'beams'; valid keys: "
        "num_beams, execution_guided, schema_constrained",
        config=lambda d: hp(d)["eval"].update(validation_decoding={"beams": 4}),
    ),
    Case(
        "split-not-summing-to-one",
        "train + valid + test must sum to 1, found 1.1",
        config=lambda d: hp(d)["data"]["split"].update(train=0.9),
    ),
    Case(
        "determined-schema",
        "not a valid Determined experiment config",
        config=lambda d: d["resources"].update(slots_per_trial="two"),
    ),
    Case(
        "missing-deepspeed-config",
        "training_args.deepspeed: config file 'ds_configs/nope.json' not found",
        config=lambda d: ta(d).update(deepspeed="ds_configs/nope.json"),
    ),
    # ---- datasets ----------------------------------------------------------------------------
    Case(
        "data-missing-columns",
        "missing column(s) 'question' for format 'sql-create-context'; found columns: answer",
        data_file=("rows.jsonl", b'{"q": "x", "context": "c", "answer": "SELECT 1"}\n'),
    ),
    Case(
        "data-wrong-encoding",
        "is not valid UTF-8",
        data_file=("rows.jsonl", ROW + b'{"question": "caf\xe9", "context": "c", "answer": "s"}\n'),
    ),
    Case("data-empty", "is empty (0 bytes)", data_file=("rows.jsonl", b"")),
    Case(
        "data-null",
        "row 2: column 'question' is null",
        data_file=("rows.jsonl", ROW + b'{"question": null, "context": "c", "answer": "s"}\n'),
    ),
    Case(
        "data-invalid-json",
        "rows.jsonl:2: invalid JSON",
        data_file=("rows.jsonl", ROW + b'{"question": "x", "context": \n'),
    ),
    Case(
        "data-unsupported-type",
        "unsupported file type .txt",
        data_file=("rows.txt", b"question,answer\n"),
    ),
    Case(
        "data-nonexistent-path",
        "dataset path '/nonexistent/rows.jsonl' does not exist",
        config=lambda d: hp(d)["data"].update(
            sources=[{"format": "sql-create-context", "path": "/nonexistent/rows.jsonl"}]
        ),
    ),
    Case(
        "data-unknown-format",
        "format: unknown 'wikisql'; expected one of clinton",
        config=lambda d: hp(d)["data"].update(sources=[{"format": "wikisql"}]),
    ),
    # ---- CLI arguments -----------------------------------------------------------------------
    Case("cli-unknown-subcommand", "invalid choice: 'trian'", argv=["trian", "exp.yaml"]),
    Case(
        "cli-unknown-flag",
        "unrecognized arguments: --max-steps 3",
        extra_args=["--max-steps", "3"],
    ),
    Case(
        "cli-missing-file",
        "experiment file missing.yaml does not exist",
        argv=["run", "missing.yaml"],
    ),
    Case("cli-directory-as-file", "is a directory; give a .yaml file", argv=["run", "."]),
    Case(
        "cli-bad-set",
        "--set 'max_steps': expected key=value",
        extra_args=["--set", "max_steps"],
    ),
    Case("cli-bad-slots", "--slots must be >= 1, found 0", extra_args=["--slots", "0"]),
    Case(
        "cli-missing-checkpoint",
        "checkpoint folder /nonexistent/ckpt does not exist",
        argv=["evaluate", "--checkpoint", "/nonexistent/ckpt"],
    ),
    Case(
        "cli-missing-trial-dir",
        "/nonexistent/trial-1",
        argv=["mirror", "--trial-dir", "/nonexistent/trial-1"],
    ),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def _run_case(case: Case, root: Path, model: Path) -> Outcome:
    work = root / case.id
    work.mkdir()
    base = yaml.safe_load(
        tiny.write_experiment(work / "base.yaml", model, name="tiny", steps=2).read_text()
    )
    exp = work / "exp.yaml"
    if case.raw_yaml is not None:
        exp.write_bytes(case.raw_yaml)
    else:
        if case.data_file is not None:
            name, content = case.data_file
            (work / name).write_bytes(content)
            hp(base)["data"]["sources"] = [{"format": case.data_format, "path": str(work / name)}]
        if case.config is not None:
            case.config(base)
        text = yaml.safe_dump(base, sort_keys=False)
        if case.yaml_edit is not None:
            edited = case.yaml_edit(text)
            assert edited != text, f"{case.id}: yaml_edit changed nothing"
            text = edited
        exp.write_text(text)
    # A run folder that already exists for this experiment name: must stay untouched.
    runs = work / "runs"
    trial = runs / "tiny" / "trial-1"
    trial.mkdir(parents=True)
    (runs / "tiny" / "experiment.yaml").write_text("name: tiny\n# the previous run's config\n")
    (trial / "trial.json").write_text('{"trial_id": 1, "state": "COMPLETED"}')
    (trial / "metrics.jsonl").write_text('{"group": "training", "steps_completed": 1}\n')
    before = _snapshot(runs)

    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TEXT2SQL_DEBUG", None)
    env["TEXT2SQL_RUNS"] = str(runs)
    if case.block_bitsandbytes:
        hook = work / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(BLOCK_BNB)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO_ROOT)])
    argv = case.argv or ["run", "exp.yaml", "--runs-dir", str(runs), "--no-mirror"]
    argv = argv + case.extra_args
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.cli", *argv],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except subprocess.TimeoutExpired as e:  # fail this case only, not the whole table
        return Outcome(0, str(e.stdout or ""), f"TIMEOUT: {e}", before, _snapshot(runs))
    return Outcome(proc.returncode, proc.stdout, proc.stderr, before, _snapshot(runs))


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Outcome]:
    # Only the cases this session selected (-k), all at once.
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if hasattr(item, "callspec") and "case" in item.callspec.params
    }
    root = tmp_path_factory.mktemp("bad-input")
    # Every case fails before a model is loaded: a folder that looks like one is enough.
    model = root / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    # A few at a time: each child spends most of its time importing.
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.id: pool.submit(_run_case, c, root, model) for c in CASES if c.id in selected}
        return {k: f.result() for k, f in futures.items()}


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error(
    case: Case, outcomes: dict[str, Outcome], spider_dir: Path
) -> None:
    out = outcomes[case.id]
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    assert "Traceback" not in both, both
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    assert case.expect in errors[0], errors[0]
    assert "unexpected" not in errors[0], errors[0]  # a bug report, not a user error
    assert out.after == out.before, "the existing run folder was modified"
