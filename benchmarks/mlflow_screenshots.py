"""Screenshots of what a user sees in the MLflow UI after ``text2sql run`` / ``text2sql mirror``.

Takes a running MLflow tracking server (``mlflow server`` or ``mlflow ui``) and writes PNGs of:

1. ``run.png``: the training run (description, source + git commit, datasets, metrics,
   registered model);
2. ``evaluation-runs.png``: the experiment's "Evaluation runs" list (base and fine-tuned);
3. ``evaluation-run.png``: the fine-tuned evaluation run's examples and verdicts;
4. ``evaluation-compare.png``: the same with "compare to" the base model's run: both models'
   SQL and verdicts, question by question;
5. ``models.png``: the experiment's models (fine-tuned and base);
6. ``model.png``: the fine-tuned model with its metrics on the test dataset;
7. ``model-version.png``: the registered version.

Usage (headless Chromium + chromedriver: ``apt-get install -y chromium chromium-driver``;
``pip install -e ".[screenshots]"``, i.e. selenium==4.50.0)::

    mlflow server --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1 --port 5000 &
    python benchmarks/mlflow_screenshots.py http://127.0.0.1:5000 screenshots/ \\
        [--experiment smollm2-135m-lora-cpu] [--settle 8]

The experiment defaults to the most recently created one that has a mirrored checkpoint;
within it the latest mirrored checkpoint is shown.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A fresh browser profile gets the "MLflow Assistant" panel opened over a third of the page.
ASSISTANT_CLOSED = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def find_targets(tracking_uri: str, experiment: str | None) -> dict[str, Any]:
    """Experiment, training run, evaluation runs and registered version to photograph."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            sys.exit(f"error: no experiment named {experiment!r} at {tracking_uri}")
        exps = [exp]
    else:
        exps = sorted(client.search_experiments(), key=lambda e: -(e.creation_time or 0))
    for exp in exps:
        trained = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`text2sql.checkpoint_uuid` != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not trained:
            continue
        run = trained[0]
        uuid = run.data.tags["text2sql.checkpoint_uuid"]
        evals = {
            r.data.tags.get("text2sql.evaluation.model"): r.info.run_id
            for r in client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`text2sql.evaluation.checkpoint_uuid` = '{uuid}'",
            )
        }
        version = run.data.tags.get("text2sql.stage.registered")
        model_name = None
        if version:
            for mv in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
                model_name = mv.name
        model_uri = run.data.tags.get("text2sql.model_uri", "")
        return {
            "experiment_id": exp.experiment_id,
            "run_id": run.info.run_id,
            "evals": evals,
            "model_id": model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None,
            "model_name": model_name,
            "version": version,
        }
    sys.exit(
        f"error: no mirrored checkpoint (run tagged text2sql.checkpoint_uuid) at {tracking_uri}"
    )


def pages(base: str, t: dict[str, Any]) -> list[tuple[str, str]]:
    exp = t["experiment_id"]
    out = [("run", f"{base}/#/experiments/{exp}/runs/{t['run_id']}")]
    evals = t["evals"]
    out.append(("evaluation-runs", f"{base}/#/experiments/{exp}/evaluation-runs"))
    if "fine-tuned" in evals:
        run_traces = f"{base}/#/experiments/{exp}/runs/{evals['fine-tuned']}/traces"
        out.append(("evaluation-run", run_traces))
        if "base" in evals:
            # The run's evaluation table with "compare to" set to the base model's run.
            out.append(("evaluation-compare", f"{run_traces}?compareToRunUuid={evals['base']}"))
    out.append(("models", f"{base}/#/experiments/{exp}/models"))
    if t["model_id"]:
        out.append(("model", f"{base}/#/experiments/{exp}/models/{t['model_id']}"))
    if t["model_name"] and t["version"]:
        out.append(("model-version", f"{base}/#/models/{t['model_name']}/versions/{t['version']}"))
    return out


def wait_until_settled(driver: Any, settle: float, timeout_s: float = 120.0) -> None:
    """Wait until the page's text stops changing (the UI fetches its data after loading)."""
    deadline = time.monotonic() + timeout_s
    time.sleep(settle)
    # Should the assistant panel open anyway, close it (it covers a third of the page).
    driver.execute_script(
        "document.querySelectorAll('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
        ".forEach(b => b.click());"
    )
    previous = None
    while time.monotonic() < deadline:
        text = driver.execute_script(
            "return document.readyState + document.body.innerText.length + ':' + "
            "document.querySelectorAll('[class*=skeleton i], [aria-busy=true]').length"
        )
        if text == previous and text.endswith(":0"):
            return
        previous = text
        time.sleep(2.0)


def shoot(
    urls: list[tuple[str, str]], out: Path, *, width: int, height: int, settle: float
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="mlflow-shots-profile-"))
    opts = webdriver.ChromeOptions()
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver_path = shutil.which("chromedriver")
    service = Service(executable_path=driver_path) if driver_path else Service()
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        out.mkdir(parents=True, exist_ok=True)
        driver.get(urls[0][1].split("#", 1)[0])
        for key, value in ASSISTANT_CLOSED.items():
            driver.execute_script(
                "window.localStorage.setItem(arguments[0], arguments[1]);", key, value
            )
        for name, url in urls:
            driver.get(url)
            driver.refresh()  # a hash change alone does not reload the app
            wait_until_settled(driver, settle)
            path = out / f"{name}.png"
            driver.save_screenshot(str(path))
            print(f"{path}  <- {url}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "tracking_uri", help="URL of a running MLflow server, e.g. http://127.0.0.1:5000"
    )
    p.add_argument("out", type=Path, help="folder for the PNGs")
    p.add_argument("--experiment", help="experiment name (default: the latest mirrored one)")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait after each load")
    ns = p.parse_args(argv)
    base = ns.tracking_uri.rstrip("/")
    targets = find_targets(base, ns.experiment)
    shoot(pages(base, targets), ns.out, width=ns.width, height=ns.height, settle=ns.settle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
