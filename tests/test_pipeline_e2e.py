"""The real pipeline on a tiny model: train (LoRA and full), checkpoint, mirror to MLflow.

What is real here: the HF Trainer, peft, the run store, the SQLite judge on real Spider
databases, MLflow (SQLite store) with a pyfunc model loaded back from the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _train(exp_path: Path, runs: Path, overrides: list[str] | None = None):
    from trainer.experiment import load_experiment
    from trainer.local_runner import launch

    exp = load_experiment(exp_path, overrides or [])
    return launch(exp, runs, progress=False)


def test_lora_training_loss_decreases_and_only_adapter_changes(
    isolated: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    from safetensors.torch import load_file

    exp = tiny.write_experiment(isolated / "exp.yaml", tiny_llama, steps=12, lr=3e-2)
    # 24 examples -> ~19 train rows: 12 steps of 4 revisit them, so the loss must fall.
    result = _train(exp, isolated / "runs", ["data.number_of_samples=24"])
    summary = result.summary
    assert summary is not None and summary["global_step"] == 12
    losses = summary["losses"]
    assert len(losses) >= 10
    # Loss went down: mean of the last 3 logged losses well below the first 3.
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    trial = result.trial
    cps = trial.checkpoints()
    assert cps and cps[-1]["steps_completed"] == 12
    ckpt = trial.checkpoint_path(cps[-1]["uuid"])
    # Determined layout + our manifest, weights as safetensors.
    for name in (
        "metadata.json",
        "text2sql.json",
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["steps_completed"] == 12 and "eval_execution_accuracy" in meta["metrics"]

    # Every LoRA B matrix (initialised to zero) changed; base weights are untouched.
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    b_mats = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b_mats and all(v.abs().sum() > 0 for v in b_mats.values())
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    merged_base = loaded.model.get_base_model().state_dict()
    for k, v in base.state_dict().items():
        key = next(
            (
                m
                for m in merged_base
                if m.endswith(k.replace(".weight", ".base_layer.weight")) or m == k
            ),
            None,
        )
        assert key is not None, k
        assert torch.equal(merged_base[key], v), f"base weight {k} changed"

    # Metrics by step in the run store: training loss every step, validation at the end.
    hist = trial.metric_history()
    assert [s for s, _ in hist["training"]][:12] == list(range(1, 13))
    assert hist["validation"][-1][0] == 12
    assert "eval_execution_accuracy" in hist["validation"][-1][1]


def test_one_slot_run_parses_the_experiment_once(
    isolated: Path, tiny_llama: Path, spider_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (one slot, no launcher) the experiment `text2sql` parsed goes on to the
    Trainer as it is: the job neither re-reads the trial folder's YAML nor parses the
    hyperparameters again, and the trial folder's YAML parses to the same hyperparameters."""
    import dataclasses
    import types

    import yaml

    import trainer.job
    from trainer.config import parse_hyperparameters
    from trainer.experiment import load_experiment
    from trainer.local_runner import launch, trial_hparams

    exp_path = tiny.write_experiment(isolated / "exp.yaml", tiny_llama, steps=2)
    exp = load_experiment(exp_path, ["data.number_of_samples=12"])

    def parsed_again(*a: object, **k: object) -> None:
        raise AssertionError("the one-slot run parsed the experiment a second time")

    monkeypatch.setattr(trainer.job, "parse_hyperparameters", parsed_again)
    # trainer.job's own view of PyYAML (peft's model card reads YAML through the real one).
    monkeypatch.setattr(trainer.job, "yaml", types.SimpleNamespace(safe_load=parsed_again))
    result = launch(exp, isolated / "runs", progress=False)
    monkeypatch.undo()
    assert result.world_size == 1 and result.summary is not None
    assert result.summary["global_step"] == 2
    written = yaml.safe_load((result.trial.experiment_dir / "experiment.yaml").read_text())
    assert dataclasses.asdict(parse_hyperparameters(written["hyperparameters"])) == (
        dataclasses.asdict(trial_hparams(exp))
    )


def test_full_finetune_changes_every_weight(
    isolated: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exp = tiny.write_experiment(isolated / "exp.yaml", tiny_llama, method="full", steps=3, lr=1e-3)
    result = _train(exp, isolated / "runs")
    ckpt = result.trial.checkpoint_path(result.trial.checkpoints()[-1]["uuid"])
    trained = load_file(str(ckpt / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, base[k])]
    assert set(changed) == set(trained), set(trained) - set(changed)


def test_mirror_to_mlflow_round_trip_identical(
    isolated: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cluster.mirror import mirror_local_trial
    from trainer.local_runner import evaluate_trial

    exp = tiny.write_experiment(
        isolated / "exp.yaml", tiny_llama, steps=4, live=True, description="Tiny e2e run"
    )
    result = _train(exp, isolated / "runs")
    uri = f"sqlite:///{isolated / 'runs' / 'mlflow.db'}"
    # Logged live, before any mirror: the three splits and the description.
    live = MlflowClient(tracking_uri=uri).get_run(result.trial.info()["mlflow_run_id"])
    assert len(live.inputs.dataset_inputs) == 3
    assert live.data.tags["mlflow.note.content"] == "Tiny e2e run"
    # The stages of `text2sql run`: evaluate, then mirror that evaluation (not a second one:
    # the report the evaluation stage wrote is the one logged, untouched).
    evaluation = evaluate_trial(result.trial.path, progress=False)
    report = evaluation.paths["json"]
    written = (report.stat().st_mtime_ns, report.read_bytes())
    mirrored = mirror_local_trial(result.trial.path, progress=False, evaluation=evaluation)
    assert (report.stat().st_mtime_ns, report.read_bytes()) == written
    assert mirrored.tracking_uri == uri and mirrored.version == "1" and mirrored.champion
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(mirrored.run_id)
    # One run: the live training run was reused, with loss by step and eval metrics.
    assert run.info.run_id == result.trial.info()["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    assert run.data.metrics["roundtrip_identical"] == 1.0
    assert "fine-tuned_exec_accuracy" in run.data.metrics
    assert run.data.params["method"] == "lora"
    mv = client.get_model_version_by_alias("tiny", "champion")
    assert str(mv.version) == "1"
    # Loading the registered version reproduces the in-memory model's greedy SQL exactly.
    from evaluation.checkpoint_eval import test_examples
    from evaluation.generation import generate_sql
    from trainer.checkpoint import load_checkpoint

    trial = result.trial
    loaded = load_checkpoint(trial.checkpoint_path(trial.checkpoints()[-1]["uuid"]))
    examples = test_examples(loaded)
    expected = generate_sql(
        loaded.model,
        loaded.tokenizer,
        examples,
        loaded.plan,
        batch_size=8,
        max_new_tokens=12,
        progress=False,
    ).sql
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny/1")
    import pandas as pd

    got = pyfunc.predict(
        pd.DataFrame([{"question": e.question, "context": e.context} for e in examples]),
        params={"max_new_tokens": 12},
    )
    assert list(got["sql"]) == expected

    # What the MLflow UI shows (issue 17): the splits as datasets, a GenAI experiment whose
    # "Evaluation runs" hold base and fine-tuned, the judge's figures on the logged model.
    from cluster.mlflow_eval import find_evaluation_runs, run_traces

    exp_id = run.info.experiment_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"
    assert sorted(d.dataset.name.rsplit("/", 1)[1] for d in run.inputs.dataset_inputs) == [
        "test",
        "train",
        "valid",
    ]
    manifest = json.loads((loaded.path / "text2sql.json").read_text())
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {manifest["data_report"]["cache_key"]}
    assert run.data.tags["mlflow.note.content"].startswith("Tiny e2e run")
    assert run.data.tags["mlflow.source.name"] == str(exp.resolve())
    git = manifest["provenance"]["git"]  # recorded by the trainer, in the checkpoint
    assert run.data.tags.get("mlflow.source.git.commit") == git.get("mlflow.source.git.commit")
    uuid = run.data.tags["text2sql.checkpoint_uuid"]
    evals = find_evaluation_runs(client, exp_id, uuid)
    assert sorted(evals) == ["base", "fine-tuned"]
    for ev in evals.values():
        assert ev.info.status == "FINISHED"
        assert len(run_traces(client, exp_id, ev.info.run_id)) == len(examples)
    model = client.get_logged_model(mv.source.split("/", 1)[1])
    assert model.name == f"fine-tuned-{uuid[:8]}"
    on_model = {m.key: m.value for m in model.metrics}
    assert on_model["execution_accuracy"] == run.data.metrics["fine-tuned_exec_accuracy"]
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": 1}]

    # Re-running changes nothing: no new run, no new version.
    again = mirror_local_trial(result.trial.path, progress=False)
    assert again.skipped and again.run_id == mirrored.run_id
    assert len(client.search_model_versions("name='tiny'")) == 1
    assert len(client.search_runs([exp_id])) == 3  # training + base and fine-tuned evaluations


def test_run_no_mirror_still_writes_the_evaluation_report(
    isolated: Path, tiny_llama: Path, spider_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`text2sql run --no-mirror` = train, evaluate; only MLflow is skipped. The report of the
    best checkpoint is in `<trial>/evaluation-<uuid8>/`, scored on the test split."""
    from trainer.cli import main
    from trainer.run_store import TrialDir

    exp = tiny.write_experiment(isolated / "exp.yaml", tiny_llama, steps=2)
    runs = isolated / "runs"
    argv = ["run", str(exp), "--runs-dir", str(runs), "--no-mirror", "--no-progress"]
    assert main([*argv, "--set", "data.number_of_samples=40"]) == 0
    trial = TrialDir(runs / "tiny" / "trial-1")
    [ckpt] = trial.checkpoints()
    report_dir = trial.path / f"evaluation-{ckpt['uuid'][:8]}"
    names = {"report.md", "report.json", "exec_accuracy.png", "per_example.csv", "curves.png"}
    assert names <= {p.name for p in report_dir.iterdir()}
    report = json.loads((report_dir / "report.json").read_text())
    assert sorted(report["models"]) == ["base", "fine-tuned"]  # eval.compare_base defaults on
    n = len(report["examples"])
    assert 0 < n <= 8  # eval.test_samples: 8
    for model in report["models"].values():
        assert model["overall"]["n"] == n
    out = capsys.readouterr().out
    assert f"report: {report_dir / 'report.md'}" in out
    assert "MLflow: skipped (--no-mirror)" in out
    # Nothing reached MLflow: no store, no artifacts.
    assert not (runs / "mlflow.db").exists() and not (runs / "mlartifacts").exists()
