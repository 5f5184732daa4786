"""A run's report as one self-contained HTML page, built from the run's own files, for clusters that cannot
reach W&B and for anyone who gets the run directory.

    python -m pretrain.html_report RUN_DIR [--out FILE]        (or: make report RUN=runs/<name>)

It reads `metrics.jsonl` and `config.yaml` and draws the loss (training and validation), learning-rate,
throughput and few-shot curves as inline SVG (matplotlib), with a summary table. The page has no scripts and
loads nothing: it can be copied off an air-gapped cluster and opened anywhere. It is written to
RUN_DIR/report.html by default, whole or not at all.
"""

from __future__ import annotations

import collections
import html
import io
import math
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, run_command
from data_pipeline.common.errors import UserError
from data_pipeline.common.files import write_atomically
from data_pipeline.common.plotting import headless_pyplot
from data_pipeline.common.wandb_runs import WANDB_ID_FILE
from evals.fewshot_results import draw_accuracy_against_k, fewshot_metric
from pretrain.config import Config
from pretrain.rundir.reader import metrics_path, read_metrics, run_config

# Training loss is noisy step to step: the report draws it raw (faint) and as a moving average over this many.
SMOOTHING_STEPS = 25


class ReportError(UserError):
    """A run directory the report cannot be made from; the message names it and what to do."""


def load_run(run_dir: Path) -> tuple[Config, list[dict]]:
    """The run's resolved config and its metrics records, in step order."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; pass the directory of a run (runs/<name>)")
    path = metrics_path(run_dir)
    if not path.exists():
        raise ReportError(f"{path}: not found; is {run_dir} a run directory, and has its first step run?")
    records = read_metrics(run_dir)
    if not records:
        raise ReportError(f"{path}: holds no steps yet; make the report once the run has logged some")
    return run_config(run_dir), sorted(records, key=lambda record: record["step"])


def series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    points = [(record[x], record[key]) for record in records if key in record and x in record]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` finite values at each point (non-finite steps are left out)."""
    averaged, recent = [], collections.deque(maxlen=window)
    for value in values:
        if math.isfinite(value):
            recent.append(value)
        averaged.append(sum(recent) / len(recent) if recent else math.nan)
    return averaged


def svg(figure) -> str:
    plt = headless_pyplot()
    buffer = io.StringIO()
    figure.tight_layout()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: the XML prologue and doctype belong to a file, not a page


def figures(config: Config, records: list[dict]) -> list[tuple[str, str]]:
    """(caption, inline SVG) for each chart the run's records can fill."""
    plt = headless_pyplot()
    drawn = []

    def new(title: str, xlabel: str, ylabel: str):
        figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        return figure, axes

    tokens, losses = series(records, "train/loss", x="train/tokens")
    if losses:
        figure, axes = new("loss", "tokens seen", "cross-entropy (nats per token)")
        axes.plot(tokens, losses, color="C0", alpha=0.3, linewidth=0.8, label="train (each step)")
        axes.plot(tokens, moving_average(losses, SMOOTHING_STEPS), color="C0",
                  label=f"train ({SMOOTHING_STEPS}-step mean)")
        val_tokens, val_losses = series(records, "val/loss", x="train/tokens")
        axes.plot(val_tokens, val_losses, color="C1", marker="o", label="validation")
        axes.legend()
        drawn.append(("Loss against tokens seen. Non-finite steps (skipped) leave gaps.", svg(figure)))
    steps, rates = series(records, "train/lr")
    if rates:
        figure, axes = new("learning rate", "step", "learning rate")
        axes.plot(steps, rates, color="C2")
        drawn.append((f"Learning rate at each step ({config.train.schedule} schedule).",
                      svg(figure)))
    steps, throughput = series(records, "perf/tokens_per_second")
    if throughput:
        figure, axes = new("throughput", "step", "tokens per second (all ranks)")
        axes.plot(steps, throughput, color="C3", alpha=0.4, linewidth=0.8)
        axes.plot(steps, moving_average(throughput, SMOOTHING_STEPS), color="C3")
        drawn.append(("Training throughput: each step (faint) and its moving average.", svg(figure)))
    fewshot: dict[str, dict[int, list[tuple[int, float]]]] = {}  # task -> k -> [(step, accuracy)]
    for record in records:
        for key, value in record.items():
            if task_and_k := fewshot_metric(key):
                task, k = task_and_k
                fewshot.setdefault(task, {}).setdefault(k, []).append((record["step"], value))
    if fewshot:
        last_step = max(step for by_k in fewshot.values() for points in by_k.values() for step, _ in points)
        figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
        latest = {task: [(k, points[-1][1], math.nan) for k, points in by_k.items() if points[-1][0] == last_step]
                  for task, by_k in fewshot.items()}
        draw_accuracy_against_k(axes, latest, f"few-shot accuracy at step {last_step}")
        drawn.append(("In-context accuracy against the number of examples in the prompt, at the last evaluation.",
                      svg(figure)))
        for task, by_k in fewshot.items():
            figure, axes = new(f"{task}: accuracy during training", "step", "accuracy")
            for k, points in sorted(by_k.items()):
                axes.plot([s for s, _ in points], [a for _, a in points], marker="o", label=f"k={k}")
            axes.set_ylim(0, 1)
            axes.legend(ncol=2)
            drawn.append((f"{task}: how the accuracy at each k formed as training went.", svg(figure)))
    return drawn


def summary(run_dir: Path, config: Config, records: list[dict]) -> list[tuple[str, str]]:
    last = records[-1]
    model = config.model
    finite = [r["train/loss"] for r in records if "train/loss" in r and math.isfinite(r["train/loss"])]
    validation = [r["val/loss"] for r in records if "val/loss" in r]
    wandb_id = run_dir / WANDB_ID_FILE
    rows = [
        ("run", f"{config.name} ({run_dir})"),
        ("steps", f"{last['step']:,} of {config.train.max_steps:,}"),
        ("tokens seen", f"{max(r.get('train/tokens', 0) for r in records):,}"),
        ("model", ", ".join(f"{key} {getattr(model, key)}"
                            for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"))),
        ("last training loss", f"{finite[-1]:.4f}" if finite else "none finite"),
        ("validation loss (first, last, best)",
         f"{validation[0]:.4f}, {validation[-1]:.4f}, {min(validation):.4f}" if validation else "not evaluated"),
        ("skipped non-finite steps", str(int(last.get("train/skipped_steps", 0)))),
        ("W&B run id", wandb_id.read_text().strip() if wandb_id.exists() else "W&B not used"),
    ]
    return rows


def render(run_dir: Path) -> str:
    config, records = load_run(run_dir)
    rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                   for label, value in summary(run_dir, config, records))
    charts = "".join(f"<figure>{chart}<figcaption>{html.escape(caption)}</figcaption></figure>"
                     for caption, chart in figures(config, records))
    title = html.escape(f"{config.name}: training report")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 760px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0 0 2em 0; }} figure svg {{ width: 100%; height: auto; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head>
<body><h1>{title}</h1>
<table>{rows}</table>
{charts}
<p>From {html.escape(str(metrics_path(run_dir)))}; made by <code>python -m pretrain.html_report</code>.</p>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pretrain.html_report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<name>)")
    parser.add_argument("--out", type=Path, help="where to write the page (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    page = render(args.run_dir)
    out = args.out or args.run_dir / "report.html"
    if not out.parent.is_dir():
        raise ReportError(f"{out.parent}: no such directory for --out")
    write_atomically(out, page)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
