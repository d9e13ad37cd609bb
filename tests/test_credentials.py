"""Credentials never leak; nothing executes code it was not told to trust.

- A full local run of the tiny model (``text2sql run`` with live MLflow logging, evaluation and
  mirroring into a local MLflow store) with fake credentials in the environment: every file the
  run wrote (run folder, MLflow SQLite store and artifacts, data cache) and its stdout/stderr
  are scanned for the secret values. None may appear.
- ``trust_remote_code`` is false unless the experiment sets it, and no code passes a literal
  ``trust_remote_code=True``.
- Checkpoints are read with safetensors or ``torch.load(weights_only=True)``: no plain
  ``torch.load`` / ``pickle.load`` in the packages, and weights are written as safetensors.
- Any MLflow server the project starts or documents listens on 127.0.0.1.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "cluster", "evaluation", "dataset_utils")

# Account names: not secret, and MLflow itself records the tracking username as the
# `mlflow.user` tag of what it logs (who logged it). They may appear there and nowhere else.
IDENTITIES = {
    "DET_USER": "fake-det-user-5b1e",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user-77ab",
}
SECRETS = {
    "DET_PASS": "fake-det-pass-Zq81c0ffee",
    "DET_USER_TOKEN": "fake-det-token-v2.aGVsbG8gd29ybGQ",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-Jx93deadbeef",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-Qm4f8b2e",
    "HF_TOKEN": "hf_fakeTokenAbCdEfGhIjKlMnOpQrStUv",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeLegacyTokenZyXwVuTsRq",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AZURE_STORAGE_CONNECTION_STRING": "fake-azure-AccountKey=c2VjcmV0LWtleQ",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": "fake-gcp-private-key-9f8e7d",
}


def _identities_outside_user_tags(db: Path) -> list[str]:
    """Every cell of the MLflow store holding an account name, unless it is a `mlflow.user`
    tag value (the row's key column says so) or an assessment's source (who judged)."""
    import sqlite3

    found = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            # The cursor's own column names (PRAGMA table_info lists fewer for the full-text
            # search tables MLflow 3.17 keeps).
            cursor = conn.execute(f"SELECT * FROM '{table}'")
            cols = [d[0] for d in cursor.description]
            for row in cursor:
                cells = dict(zip(cols, row, strict=True))
                is_user_tag = "mlflow.user" in (cells.get("key"), cells.get("tag_key"))
                for col, value in cells.items():
                    text = value.decode(errors="replace") if isinstance(value, bytes) else value
                    # MLflow 3.17 also names the user as the source of the judge's
                    # assessments on the evaluation traces (mlflow.genai.evaluate).
                    allowed = (is_user_tag and col in ("value", "tag_value")) or (
                        table == "assessments" and col == "source_id"
                    )
                    for var, ident in IDENTITIES.items():
                        if isinstance(text, str) and ident in text and not allowed:
                            found.append(f"{var} in {db} {table}.{col}")
    finally:
        conn.close()
    return found


def _python_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))]


@pytest.mark.slow
def test_full_run_with_fake_credentials_leaks_nothing(tmp_path: Path, spider_dir: Path) -> None:
    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(tmp_path / "exp.yaml", model, name="creds", steps=3, live=True)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.update(SECRETS)
    env.update(IDENTITIES)
    env["HF_HUB_OFFLINE"] = "1"
    env["TEXT2SQL_CACHE"] = str(tmp_path / "cache")  # the run's cache writes are scanned too
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DET_MASTER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "run", str(exp), "--runs-dir", "runs"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = work / "runs"
    # The run really did the whole job: checkpoints, MLflow store, artifacts, registry.
    assert (runs / "mlflow.db").is_file()
    assert list((runs / "creds" / "trial-1" / "checkpoints").glob("*/adapter_model.safetensors"))
    assert list((runs / "mlartifacts").rglob("*.safetensors"))
    # Weights are safetensors. training_args.bin is the Trainer's own pickled record of its
    # arguments: nothing here unpickles it (see test_checkpoints_are_never_unpickled_blindly).
    pickles = [p for p in runs.rglob("*.bin") if p.name != "training_args.bin"]
    assert not pickles, f"weights must be safetensors, not pickles: {pickles}"

    scanned = 0
    leaks = []
    texts = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    for root in (work, tmp_path / "cache"):
        for f in sorted(root.rglob("*")):
            if f.is_file() and not f.is_symlink():
                texts[str(f)] = f.read_bytes()
    store = str(runs / "mlflow.db")
    for name, blob in texts.items():
        scanned += 1
        for var, secret in SECRETS.items():
            if secret.encode() in blob:
                leaks.append(f"{var} in {name}")
        for var, ident in IDENTITIES.items():
            if ident.encode() in blob and name != store:  # the store: checked row by row below
                leaks.append(f"{var} in {name}")
    leaks += _identities_outside_user_tags(runs / "mlflow.db")
    assert scanned > 50
    assert not leaks, leaks

    # MLflow params/tags, read back through the API (as a viewer would see them).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    for e in client.search_experiments():
        for run in client.search_runs([e.experiment_id]):
            values = list(run.data.params.values()) + list(run.data.tags.values())
            for v in values:
                assert not any(s in v for s in SECRETS.values()), v
            assert not any(k in SECRETS for k in run.data.params), run.data.params


def test_trust_remote_code_is_off_unless_configured() -> None:
    from trainer.config import ModelArgs, parse_hyperparameters

    assert ModelArgs().trust_remote_code is False
    assert parse_hyperparameters({}).model.trust_remote_code is False
    on = parse_hyperparameters({"model": {"trust_remote_code": True}})
    assert on.model.trust_remote_code is True
    # No code passes a literal True; every trust_remote_code= reads the config (or is False).
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                v = node.value
                ok = (isinstance(v, ast.Constant) and v.value is False) or (
                    isinstance(v, ast.Attribute) and v.attr == "trust_remote_code"
                )
                assert ok, f"{path}:{node.value.lineno}: trust_remote_code={ast.unparse(v)}"
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code":
                        assert not (isinstance(v, ast.Constant) and v.value is True), path


def test_checkpoints_are_never_unpickled_blindly() -> None:
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and ast.unparse(kw["weights_only"]) == "True", (
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
                )
            assert name not in ("pickle.load", "pickle.loads", "cloudpickle.load"), (
                f"{path}:{node.lineno}: {name}"
            )


def test_mlflow_servers_listen_on_localhost_only() -> None:
    sources = _python_files() + [REPO_ROOT / "README.md", REPO_ROOT / "cluster" / "README.md"]
    sources += sorted((REPO_ROOT / "cluster" / "deploy").rglob("*"))
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert "0.0.0.0" not in text, f"{path}: binds every interface"
        for m in re.finditer(r"mlflow (?:server|ui|models serve)[^\n]*", text):
            assert "--host 127.0.0.1" in m.group(0) or "--host" not in m.group(0), (
                f"{path}: {m.group(0)}"
            )


# Secrets a user writes into the experiment YAML itself (not the environment): a Hub token in
# `training_args` and a key in Determined's `environment.environment_variables`.
CONFIG_SECRETS = {
    "training_args.hub_token": "hf_SECRETxyz0c0ffee",
    "environment_variables": "envSECRET-9d8c7b6a5f",
}


@pytest.mark.slow  # a full `text2sql run` with mirror: ~2 CPU-minutes, 7 wall-minutes loaded
def test_secrets_in_the_config_never_reach_mlflow(tmp_path: Path, spider_dir: Path) -> None:
    """`text2sql run` (live MLflow logger, evaluation, mirror) of an experiment whose YAML holds
    a `training_args.hub_token` and a secret `environment_variables` entry: neither value is in
    the MLflow store (database bytes, artifacts), the trial's files or the output; the keys
    are logged with their values redacted."""
    model = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(tmp_path / "exp.yaml", model, name="cfgsecrets", steps=2, live=True)
    text = exp.read_text()
    text = text.replace(
        "    max_steps: 2\n",
        f"    max_steps: 2\n    hub_token: {CONFIG_SECRETS['training_args.hub_token']}\n",
    )
    secret_env = CONFIG_SECRETS["environment_variables"]
    text += f"environment:\n  environment_variables:\n    - MY_SERVICE_CREDS={secret_env}\n"
    exp.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DET_MASTER")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "run", str(exp), "--runs-dir", "runs"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = work / "runs"
    assert (runs / "mlflow.db").is_file()
    assert list((runs / "mlartifacts").rglob("*.safetensors"))  # the model was mirrored

    # The copy of the user's YAML the trial runs from holds the secrets by design, and so does
    # the Trainer's own pickle of its TrainingArguments in the trial's checkpoints
    # (training_args.bin: hub_token is one of them); every other file (the MLflow store's bytes
    # and every artifact in it, checkpoint manifests, reports, logs) must not.
    user_config = runs / "cfgsecrets" / "experiment.yaml"
    store = runs / "mlartifacts"
    leaks = []
    scanned = 0
    blobs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    for f in sorted(runs.rglob("*")):
        trainer_pickle = f.name == "training_args.bin" and store not in f.parents
        if f.is_file() and not f.is_symlink() and f != user_config and not trainer_pickle:
            blobs[str(f)] = f.read_bytes()
    for name, blob in blobs.items():
        scanned += 1
        for what, secret in CONFIG_SECRETS.items():
            if secret.encode() in blob:
                leaks.append(f"{what} in {name}")
    assert scanned > 30
    assert not leaks, leaks

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    seen: dict[str, str] = {}
    for e in client.search_experiments():
        for run in client.search_runs([e.experiment_id]):
            seen.update(run.data.params)
    # The keys are there (a viewer sees that a token was set), the values are not.
    assert seen["training_args.hub_token"] == "***"
    assert "MY_SERVICE_CREDS=***" in seen["config.environment.environment_variables"]
    assert seen["training_args.max_steps"] == "2"


def test_tracking_params_scrub_keys_values_urls_and_environment_variables() -> None:
    from dataset_utils.redact import scrub, tracking_params, without_credentials

    config = {
        "training_args": {
            "hub_token": "hf_SECRETxyz",
            "learning_rate": 1e-4,
            "report_to": ["none"],
            "push_to_hub": False,
        },
        "eval": {"max_new_tokens": 12},
        "model": {"name_or_path": "https://bob:s3cret@models.example.com/m", "pad_token": "<p>"},
        "mlflow": {"tracking_uri": "http://alice:pw123@mlflow.example.com:5000"},
        "db": {"password": "hunter2", "api_key": "k-123", "AWS_SECRET_ACCESS_KEY": "aws"},
        "note": "run with HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123 and DET_PASS=xyz please",
        "entrypoint": "MY_API_KEY=abc python -m trainer.finetune",
        "environment": {
            "environment_variables": {"cuda": ["NCCL_DEBUG=INFO", "SERVICE_KEY=topsecret"]},
        },
        "environment_variables": ["A=1", "B=letmein"],
    }
    params = tracking_params(config, "config")
    assert params["config.training_args.hub_token"] == "***"
    assert params["config.training_args.learning_rate"] == "0.0001"
    assert params["config.training_args.report_to"] == '["none"]'
    assert params["config.training_args.push_to_hub"] == "False"
    assert params["config.eval.max_new_tokens"] == "12"  # "tokens" is not a credential
    assert params["config.model.pad_token"] == "<p>"  # nor is a vocabulary token
    assert params["config.model.name_or_path"] == "https://models.example.com/m"
    assert params["config.mlflow.tracking_uri"] == "http://mlflow.example.com:5000"
    assert params["config.db.password"] == params["config.db.api_key"] == "***"
    assert params["config.db.AWS_SECRET_ACCESS_KEY"] == "***"
    assert params["config.note"] == "run with HF_TOKEN=*** and DET_PASS=*** please"
    assert params["config.entrypoint"] == "MY_API_KEY=*** python -m trainer.finetune"
    assert params["config.environment.environment_variables.cuda"] == (
        '["NCCL_DEBUG=***", "SERVICE_KEY=***"]'
    )
    assert params["config.environment_variables"] == '["A=***", "B=***"]'
    # Scrubbing what is already scrubbed changes nothing (the live logger scrubs what it gets).
    assert tracking_params(params) == params
    # The nested form (checkpoint manifest) keeps its shape.
    nested = scrub(config)
    assert nested["training_args"]["hub_token"] == "***"
    assert nested["training_args"]["learning_rate"] == 1e-4
    assert nested["environment_variables"] == ["A=***", "B=***"]
    assert without_credentials("git@github.com:o/r.git") == "git@github.com:o/r.git"
    assert config["training_args"]["hub_token"] == "hf_SECRETxyz"  # the input is not changed
