"""``curves.png``: training and validation loss, and validation execution accuracy, by step.

Drawn from a trial's metric history -- the local run store's ``metrics.jsonl``
(`trainer.run_store.TrialDir.metric_history`) or Determined's metrics API (the mirror's
`CheckpointSource.metric_history`), both ``{"training" | "validation": [(step, metrics)]}``.

Left panel: ``loss`` (training) and ``eval_loss`` (validation) against the optimizer step.
Right panel: ``eval_execution_accuracy`` and ``eval_executable_rate`` (%) on the fixed
validation subset scored by generation at each evaluation. A run that evaluates once (the main
job evaluates at its last step) shows one marker there. Written by ``text2sql run`` (into the
trial folder), ``text2sql evaluate`` and ``text2sql mirror`` (beside their reports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.run_store import TrialDir

History = Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]]


def series(history: History, group: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; the last report wins on a repeated step."""
    points: dict[int, float] = {}
    for step, metrics in history.get(group, ()):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            points[int(step)] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(history: History, path: str | Path, *, title: str = "") -> Path | None:
    """Write the two-panel PNG; None (nothing written) when the history has no losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = series(history, "training", "loss")
    valid = series(history, "validation", "eval_loss")
    acc = series(history, "validation", "eval_execution_accuracy")
    executable = series(history, "validation", "eval_executable_rate")
    if not train[0] and not valid[0]:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train[0]:
        ax_loss.plot(*train, label="training loss", lw=1.2)
    if valid[0]:
        ax_loss.plot(*valid, "o-", label="validation loss", lw=1.2, ms=5)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss per SQL token")
    ax_loss.set_title("loss", fontsize=10)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    if acc[0]:
        ax_acc.plot(acc[0], [100 * v for v in acc[1]], "o-", label="execution accuracy", ms=5)
        ax_acc.annotate(
            f"{100 * acc[1][-1]:.1f}%",
            (acc[0][-1], 100 * acc[1][-1]),
            textcoords="offset points",
            xytext=(-6, 8),
            ha="right",
            fontsize=8,
        )
    if executable[0]:
        ax_acc.plot(
            executable[0],
            [100 * v for v in executable[1]],
            "s--",
            label="executable SQL",
            ms=4,
            alpha=0.7,
        )
    if acc[0] or executable[0]:
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no generation-based evaluation", ha="center", va="center")
    ax_acc.set_ylim(-3, 103)  # a 0% or 100% point stays visible
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("% of validation subset")
    ax_acc.set_title("validation (greedy generation)", fontsize=10)
    ax_acc.grid(alpha=0.3)
    if train[0] or valid[0]:
        last = max([*train[0], *valid[0], *acc[0]])
        ax_acc.set_xlim(0, last * 1.05 + 1)
        ax_loss.set_xlim(0, last * 1.05 + 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trial_curves(trial_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """``curves.png`` of a local trial (default: inside the trial folder)."""
    trial = TrialDir(Path(trial_dir))
    out = Path(path) if path else trial.path / "curves.png"
    return plot_curves(
        trial.metric_history(), out, title=f"{trial.path.parent.name} / {trial.path.name}"
    )
