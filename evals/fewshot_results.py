"""Few-shot results as a user reads them: a console table, JSON and CSV files, a PNG of the curves, and W&B."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from data_pipeline.common import wandb_runs
from data_pipeline.common.files import write_atomically
from data_pipeline.common.plotting import headless_pyplot
from evals.scores import Score

CSV_COLUMNS = [name for name in Score.__dataclass_fields__ if name != "results"]


def table(scores: list[Score]) -> str:
    """Accuracy (with its standard error) per task and k, one row per task, one column per k."""
    shots = sorted({score.k for score in scores})
    tasks = list(dict.fromkeys(score.task for score in scores))
    by_key = {(score.task, score.k): score for score in scores}
    width = max(len(task) for task in tasks) + 2
    lines = ["acc ± stderr".ljust(width) + "".join(f"k={k}".rjust(15) for k in shots)]
    for task in tasks:
        cells = "".join(f"{by_key[task, k].acc:.3f} ± {by_key[task, k].acc_stderr:.3f}".rjust(15) for k in shots)
        lines.append(task.ljust(width) + cells)
    dropped = [score for score in scores if score.dropped_examples or score.truncated_items]
    for score in dropped:
        lines.append(
            f"{score.task} k={score.k}: {score.dropped_examples} examples dropped to fit the context,"
            f" {score.truncated_items} prompts truncated"
        )
    return "\n".join(lines)


def write_files(scores: list[Score], out_dir: Path, about: dict) -> list[Path]:
    """fewshot.json (the scores with what was evaluated), fewshot.csv and fewshot.png, each written whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO(newline="")
    writer = csv.DictWriter(rows, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(score.as_dict() for score in scores)
    return [
        write_atomically(out_dir / "fewshot.json",
                         json.dumps({**about, "scores": [score.as_dict() for score in scores]}, indent=2) + "\n"),
        write_atomically(out_dir / "fewshot.csv", rows.getvalue()),
        write_atomically(out_dir / "fewshot.png", lambda path: plot(scores, path, about.get("title", ""))),
    ]


def draw_accuracy_against_k(axes, curves: dict[str, list[tuple[int, float, float]]], title: str) -> None:
    """One line per task through its (k, accuracy, standard error) points."""
    for task, points in curves.items():
        points = sorted(points)
        errors = [0.0 if math.isnan(stderr) else stderr for _k, _acc, stderr in points]
        axes.errorbar([k for k, _, _ in points], [acc for _, acc, _ in points], yerr=errors, marker="o", capsize=3,
                      label=task)
    # k = 0 belongs on the axis, so the scale is linear near zero and logarithmic beyond.
    axes.set_xscale("symlog", base=2, linthresh=1)
    shots = sorted({k for points in curves.values() for k, _, _ in points})
    axes.set_xticks(shots, [str(k) for k in shots])
    axes.set_ylim(0, 1)
    axes.set_xlabel("examples in the prompt (k)")
    axes.set_ylabel("accuracy")
    axes.set_title(title or "in-context few-shot accuracy")
    axes.grid(alpha=0.3)
    axes.legend()


def plot(scores: list[Score], path: Path, title: str) -> None:
    plt = headless_pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for score in scores:
        curves.setdefault(score.task, []).append((score.k, score.acc, score.acc_stderr))
    draw_accuracy_against_k(axes, curves, title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def log_to_wandb(scores: list[Score], run) -> None:
    """A table of every score and a line chart of accuracy against k, one line per task, into a W&B run."""
    rows = [[getattr(score, column) for column in CSV_COLUMNS] for score in scores]
    run.log({"eval/fewshot/table": wandb_runs.table(CSV_COLUMNS, rows)})
    tasks = list(dict.fromkeys(score.task for score in scores))
    shots = sorted({score.k for score in scores})
    by_key = {(score.task, score.k): score.acc for score in scores}
    chart = wandb_runs.line_series(
        xs=shots, ys=[[by_key[task, k] for k in shots] for task in tasks], keys=tasks,
        title="few-shot accuracy against k", xname="k",
    )
    run.log({"eval/fewshot/curve": chart})


def metrics_for_logging(scores: list[Score]) -> dict[str, float]:
    """The names the training loop logs at each evaluation: `eval/fewshot/<task>/k=<k>` -> accuracy, beside it
    `.../acc_norm` and `.../bits_per_byte` (the task loss), and `eval/fewshot/<task>/seconds` the task took."""
    metrics = {}
    for score in scores:
        name = f"eval/fewshot/{score.task}/k={score.k}"
        metrics |= {name: score.acc, f"{name}/acc_norm": score.acc_norm,
                    f"eval/fewshot/{score.task}/seconds": score.seconds}
        if score.bits_per_byte is not None:
            metrics[f"{name}/bits_per_byte"] = score.bits_per_byte
    return metrics


FEWSHOT_METRIC = re.compile(r"^eval/fewshot/(?P<task>.+)/k=(?P<k>\d+)$")


def fewshot_metric(name: str) -> tuple[str, int] | None:
    """(task, k) of a name `metrics_for_logging` gives; None for any other metric."""
    match = FEWSHOT_METRIC.match(name)
    return (match["task"], int(match["k"])) if match else None
