"""The report's plots, each a PNG written whole: fit.png, frontier.png, isoflop.png and fewshot.png."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from data_pipeline.common.plotting import headless_pyplot, log_norm, save_png
from evals.scaling.choose_k import FewshotChoice
from evals.scaling.isoflop import IsoflopProfiles
from evals.scaling.law import Law
from evals.scaling.loss_report import ComputeOptimal, FittedRun, ScalingReport, format_interval


def plot(report: ScalingReport, out_dir: Path) -> list[Path]:
    """fit.png (fitted against observed loss), frontier.png (loss against compute, with the fitted compute-optimal
    frontier), isoflop.png where the runs have isoFLOP budgets and fewshot.png where they have few-shot results."""
    plt = headless_pyplot()
    law, runs = report.law, report.runs

    observed = [run.point.loss for run in runs]
    predicted = [run.predicted_loss for run in runs]
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    axes.scatter(observed, predicted, c=np.log10([run.point.nominal_compute for run in runs]), cmap="viridis")
    span = [min(observed + predicted), max(observed + predicted)]
    axes.plot(span, span, color="grey", linestyle="--", label="fit = observed")
    held = set(report.holdout.held_out if report.holdout else [])
    for run in runs:
        if run.point.name in held:
            axes.annotate("held out", (run.point.loss, run.predicted_loss), fontsize=7)
    axes.set_xlabel("observed loss")
    axes.set_ylabel("fitted loss")
    axes.set_title("fitted against observed (colour: log10 C = 6 N D)")
    axes.legend()
    written = [save_png(figure, out_dir / "fit.png")]

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted({run.point.parameters for run in runs})
    for index, size in enumerate(sizes):
        # C = 6 N D, the compute the law's frontier is drawn in: the model's own count would shift the points.
        points = sorted((run.point.nominal_compute, run.point.loss) for run in runs if run.point.parameters == size)
        axes.plot(*zip(*points), marker="o", color=plt.cm.viridis(index / max(1, len(sizes) - 1)),
                  label=f"N = {size:.3g}")
    computes = [run.point.nominal_compute for run in runs]
    budgets = np.geomspace(min(computes) / 2, max(computes) * 10, 50)
    axes.plot(budgets, law.loss(*law.compute_optimal(budgets)), color="black", linestyle="--",
              label="compute-optimal frontier (fit)")
    axes.set_xscale("log")
    axes.set_xlabel("training compute C = 6 N D (FLOPs)")
    axes.set_ylabel("validation loss")
    axes.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    written.append(save_png(figure, out_dir / "frontier.png"))

    if report.isoflop.budgets:
        figure, (profiles, optima) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
        _draw_isoflop(profiles, optima, report.isoflop, law, report.compute_optimal)
        written.append(save_png(figure, out_dir / "isoflop.png"))
    if report.fewshot.k is not None:
        tasks = report.fewshot.tasks
        columns = min(3, len(tasks))
        rows = -(-len(tasks) // columns)
        figure, panels = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), dpi=120, squeeze=False)
        _draw_fewshot(figure, list(panels.ravel()), runs, report.fewshot)
        written.append(save_png(figure, out_dir / "fewshot.png"))
    return written


def _draw_isoflop(profiles, optima, isoflop: IsoflopProfiles, law: Law, compute_optimal: ComputeOptimal | None):
    """Left: each budget's runs, its parabola in log N and the parabola's minimum (a star); right: the minima
    against compute, with their intervals, the isoFLOP power law through them and the parametric law's N_opt."""
    plt = headless_pyplot()
    budgets = isoflop.budgets
    for index, budget in enumerate(budgets):
        colour = plt.colormaps["viridis"](index / max(1, len(budgets) - 1))
        optimum = budget.optimum
        profiles.scatter(budget.parameters, budget.losses, color=colour,
                         label=f"C = {budget.flops:.2g}" + (" (skipped)" if optimum is None else ""))
        sizes = np.linspace(np.log10(min(budget.parameters)), np.log10(max(budget.parameters)), 100)
        profiles.plot(10 ** sizes, np.polyval(budget.parabola, sizes), color=colour,
                      linestyle=":" if optimum is None else "-")
        if optimum is None:
            continue
        profiles.scatter([optimum.optimal_parameters], [optimum.loss_at_optimum], marker="*", s=200, color=colour,
                         edgecolors="black", zorder=3)
        optima.scatter([budget.flops], [optimum.optimal_parameters], color=colour)
        # A segment, not an error bar: a percentile interval need not contain the estimate.
        if optimum.optimal_parameters_interval_95:
            optima.vlines(budget.flops, *optimum.optimal_parameters_interval_95, color=colour)
    profiles.set_xscale("log")
    profiles.set_xlabel("parameters N")
    profiles.set_ylabel("validation loss")
    profiles.set_title("isoFLOP profiles: loss at a fixed compute budget (star: minimum)")
    profiles.grid(alpha=0.3)
    profiles.legend(fontsize=7)

    target = compute_optimal.isoflop if compute_optimal else None
    flops = [budget.flops for budget in budgets] + ([compute_optimal.flops] if target else [])
    span = np.geomspace(min(flops) / 2, max(flops) * 2, 50)
    if power_law := isoflop.power_law:
        exponent = power_law.parameters_exponent
        optima.plot(span, power_law.parameters_coefficient * span ** exponent, color="black",
                    label=f"isoFLOP fit: N_opt ∝ C^{exponent:.3f}"
                          f"{format_interval(power_law.parameters_exponent_interval_95)}")
        if target:
            optima.scatter([compute_optimal.flops], [target.parameters], marker="*", s=150, color="black",
                           label=f"target: N_opt {target.parameters:.3g}"
                                 f"{format_interval(target.parameters_interval_95)}")
            if target.parameters_interval_95:
                optima.vlines(compute_optimal.flops, *target.parameters_interval_95, color="black")
        optima.set_title("compute-optimal model size")
    else:
        optima.set_title(textwrap.fill(isoflop.skipped, 70), fontsize=8)
    parametric = law.beta / (law.alpha + law.beta)
    optima.plot(span, law.compute_optimal(span)[0], color="grey", linestyle="--",
                label=f"parametric fit: N_opt ∝ C^{parametric:.3f}")
    optima.set_xscale("log")
    optima.set_yscale("log")
    # Over less than a decade matplotlib labels the minor ticks too, and they overlap.
    optima.xaxis.set_minor_formatter(plt.NullFormatter())
    optima.set_xlabel("training compute C (FLOPs)")
    optima.set_ylabel("compute-optimal parameters N_opt")
    optima.grid(alpha=0.3, which="both")
    optima.legend(fontsize=7)


def _draw_fewshot(figure, panels: list, runs: list[FittedRun], fewshot: FewshotChoice) -> None:
    """One panel per task: accuracy at the chosen k against compute, one line per model size, coloured by log N
    (a colour bar rather than a legend: an isoFLOP sweep has a size or more per run)."""
    plt = headless_pyplot()
    k = fewshot.k
    sizes = sorted({run.point.parameters for run in runs})
    # Padded by a factor 1.5 either side, so that a single size still spans a range of colours.
    colours = plt.cm.ScalarMappable(log_norm(sizes[0] / 1.5, sizes[-1] * 1.5), plt.colormaps["viridis"])
    for panel, task in zip(panels, fewshot.tasks):
        for size in sizes:
            points = sorted((run.point.nominal_compute, accuracies[task, k]) for run in runs
                            if run.point.parameters == size
                            and (task, k) in (accuracies := run.point.fewshot_accuracies()))
            if points:
                panel.plot(*zip(*points), marker="o", color=colours.to_rgba(size))
        panel.set_xscale("log")
        panel.set_ylim(0, 1)
        panel.set_xlabel("training compute C = 6 N D (FLOPs)")
        panel.set_ylabel(f"accuracy at k = {k}")
        panel.set_title(f"{task}, {k}-shot")
        panel.grid(alpha=0.3)
        figure.colorbar(colours, ax=panel, label="parameters N")
    for panel in panels[len(fewshot.tasks):]:
        panel.set_visible(False)
