"""The task-scaling report's plots, each a PNG written whole: task_loss.png (step 1), accuracy.png (step 2) and
curve.png (each target's predicted accuracy against k beside the ladder's measured curves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.common.plotting import headless_pyplot, log_norm, save_png
from evals.scaling.task_law import final_points
from evals.scaling.task_report import TaskScalingReport


def _panels(plt, count: int):
    columns = min(3, count)
    rows = -(-count // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), dpi=120, squeeze=False)
    panels = list(panels.ravel())
    for panel in panels[count:]:
        panel.set_visible(False)
    return figure, panels[:count]


def plot_tasks(report: TaskScalingReport, out_dir: Path) -> list[Path]:
    """The three PNGs under `out_dir`, one panel per task and k (curve.png: per task)."""
    plt = headless_pyplot()

    sizes = sorted({point.parameters for point in report.points})
    colours = plt.cm.ScalarMappable(log_norm(sizes[0] / 1.5, sizes[-1] * 1.5), plt.colormaps["viridis"])
    target_sizes = [target.parameters for target in report.targets]
    predicted = {(p.target, p.task, p.shots): p for p in report.predictions}

    figure, panels = _panels(plt, len(report.fits))
    for panel, fit in zip(panels, report.fits):
        finals = final_points([p for p in report.points if (p.task, p.shots) == (fit.task, fit.shots)])
        panel.scatter([p.parameters for p in finals], [p.task_loss for p in finals],
                      c=[colours.to_rgba(p.parameters) for p in finals])
        # The fit along each tokens-per-parameter ratio of the ladder, out to the targets.
        span = np.geomspace(sizes[0] / 1.5, max(sizes + target_sizes) * 1.5, 60)
        for ratio in sorted({round(p.tokens / p.parameters, 1) for p in finals}):
            panel.plot(span, fit.task_loss(span, ratio * span), color="grey", linewidth=0.8)
        for target in report.targets:
            panel.scatter([target.parameters], [predicted[target.name, fit.task, fit.shots].task_loss], marker="*",
                          s=150, color="black", label=f"{target.name} (predicted)")
        panel.set_xscale("log")
        panel.set_xlabel("parameters N (lines: the fit at each of the ladder's D / N)")
        panel.set_ylabel("task loss (bits per byte), final checkpoint")
        panel.set_title(f"step 1: {fit.task}, k = {fit.shots}")
        panel.grid(alpha=0.3)
        if report.targets:
            panel.legend(fontsize=7)
    written = [save_png(figure, out_dir / "task_loss.png")]

    figure, panels = _panels(plt, len(report.fits))
    for panel, fit in zip(panels, report.fits):
        points = [p for p in report.points if (p.task, p.shots) == (fit.task, fit.shots)]
        panel.scatter([p.task_loss for p in points], [p.accuracy for p in points], s=12,
                      c=[colours.to_rgba(p.parameters) for p in points])
        losses = [p.task_loss for p in points] + [predicted[t.name, fit.task, fit.shots].task_loss
                                                  for t in report.targets]
        span = np.linspace(min(losses) * 0.95, max(losses) * 1.05, 200)
        panel.plot(span, fit.sigmoid.accuracy(span), color="black", linewidth=1)
        for target in report.targets:
            found = predicted[target.name, fit.task, fit.shots]
            panel.scatter([found.task_loss], [found.accuracy], marker="*", s=150, color="black",
                          label=f"{target.name} (predicted)")
        panel.set_ylim(0, 1)
        panel.set_xlabel("task loss (bits per byte)")
        panel.set_ylabel("accuracy")
        panel.set_title(f"step 2: {fit.task}, k = {fit.shots} (every checkpoint)")
        panel.grid(alpha=0.3)
        figure.colorbar(colours, ax=panel, label="parameters N")
    written.append(save_png(figure, out_dir / "accuracy.png"))

    tasks = list(dict.fromkeys(fit.task for fit in report.fits))
    figure, panels = _panels(plt, len(tasks))
    for panel, task in zip(panels, tasks):
        evaluated = [p for p in report.points if p.task == task]
        last = {p.run: p for p in final_points(evaluated)}  # each run's final checkpoint: its size and tokens
        for run, final in last.items():
            curve = sorted((p.shots, p.accuracy) for p in evaluated if p.run == run and p.tokens == final.tokens)
            panel.plot([k for k, _ in curve], [acc for _, acc in curve], marker=".", linewidth=0.8,
                       color=colours.to_rgba(final.parameters))
        for target in report.targets:
            curve = sorted((p.shots, p) for p in report.predictions if p.target == target.name and p.task == task)
            shots = [k for k, _ in curve]
            panel.plot(shots, [p.accuracy for _, p in curve], marker="*", markersize=10, color="black",
                       label=f"{target.name} (predicted, 95% interval)")
            bands = [p.accuracy_interval or (p.accuracy, p.accuracy) for _, p in curve]
            panel.fill_between(shots, [low for low, _ in bands], [high for _, high in bands], color="black",
                               alpha=0.15)
        # k = 0 belongs on the axis, so the scale is linear near zero and logarithmic beyond.
        panel.set_xscale("symlog", base=2, linthresh=1)
        shots = sorted({p.shots for p in evaluated})
        panel.set_xticks(shots, [str(k) for k in shots])
        panel.set_ylim(0, 1)
        panel.set_xlabel("examples in the prompt (k)")
        panel.set_ylabel("accuracy")
        panel.set_title(f"{task}: ladder and prediction")
        panel.grid(alpha=0.3)
        figure.colorbar(colours, ax=panel, label="parameters N")
        if report.targets:
            panel.legend(fontsize=7)
    written.append(save_png(figure, out_dir / "curve.png"))
    return written
