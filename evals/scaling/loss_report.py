"""The whole analysis of a ladder of runs as one `ScalingReport`: the fitted law with bootstrap intervals, a
holdout check, the isoFLOP profiles, the few-shot k to plot and the compute-optimal split of a target budget.
`to_json` is scaling.json; `summary_lines` is the table the command prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from evals.scaling.choose_k import FewshotChoice, choose_fewshot_k
from evals.scaling.isoflop import IsoflopProfiles, Split, isoflop_profiles
from evals.scaling.law import (
    ConstantIntervals,
    Interval,
    Law,
    bootstrap,
    constant_intervals,
    fit_law,
    interval,
    one_blas_thread,
)
from evals.scaling.points import CSV_COLUMNS, RunPoint, ScalingError

MIN_RUNS = 5  # a law of 5 constants


@dataclass(frozen=True)
class FittedRun:
    point: RunPoint
    predicted_loss: float

    def to_json(self) -> dict:
        return {**asdict(self.point), "compute": self.point.compute, "compute_6nd": self.point.nominal_compute,
                "predicted_loss": self.predicted_loss}


@dataclass(frozen=True)
class Holdout:
    """The law refitted without the largest-compute runs, and its relative error predicting them."""

    held_out: list[str]
    law_without_them: Law
    relative_errors: list[float]


@dataclass(frozen=True)
class ComputeOptimal:
    """The law's split of a budget of `flops`, and the isoFLOP power law's where the runs have one."""

    flops: float
    parameters: float
    tokens: float
    parameters_interval_95: Interval
    tokens_interval_95: Interval
    loss: float
    loss_interval_95: Interval
    isoflop: Split | None = None

    def to_json(self) -> dict:
        result = asdict(self)
        if self.isoflop is None:
            del result["isoflop"]
        return result


@dataclass(frozen=True)
class ScalingReport:
    law: Law
    intervals_95: ConstantIntervals
    bootstrap_samples: int
    runs: list[FittedRun]
    isoflop: IsoflopProfiles
    fewshot: FewshotChoice
    holdout: Holdout | None = None
    compute_optimal: ComputeOptimal | None = None

    def to_json(self) -> dict:
        """scaling.json, its keys in their order."""
        result = {"law": asdict(self.law), "intervals_95": asdict(self.intervals_95),
                  "bootstrap_samples": self.bootstrap_samples, "runs": [run.to_json() for run in self.runs]}
        if self.holdout is not None:
            result["holdout"] = asdict(self.holdout)
        if self.compute_optimal is not None:
            result["compute_optimal"] = self.compute_optimal.to_json()
        result["isoflop"] = self.isoflop.to_json()
        result["fewshot"] = self.fewshot.to_json()
        return result


def _holdout(points: list[RunPoint], parameters, tokens, losses, holdout: int) -> Holdout:
    order = np.argsort([point.compute for point in points])
    kept, held = order[:-holdout], order[-holdout:]
    partial = fit_law(parameters[kept], tokens[kept], losses[kept])
    predicted = partial.loss(parameters[held], tokens[held])
    return Holdout([points[i].name for i in held], partial,
                   [float(e) for e in (predicted - losses[held]) / losses[held]])


def _compute_optimal(law: Law, refits: list[Law], flops: float, isoflop: IsoflopProfiles) -> ComputeOptimal:
    optimal = [law.compute_optimal(flops)] + [refit.compute_optimal(flops) for refit in refits]
    return ComputeOptimal(
        flops=flops,
        parameters=float(optimal[0][0]), tokens=float(optimal[0][1]),
        parameters_interval_95=interval([n for n, _ in optimal[1:]]),
        tokens_interval_95=interval([d for _, d in optimal[1:]]),
        loss=float(law.loss(*optimal[0])),
        loss_interval_95=interval([refit.loss(*refit.compute_optimal(flops)) for refit in refits]),
        isoflop=isoflop.power_law.split_at(flops) if isoflop.power_law else None,
    )


@one_blas_thread
def analyse(points: list[RunPoint], target_flops: float | None, samples: int, holdout: int, seed: int = 0,
            fewshot_k: int | None = None) -> ScalingReport:
    """Everything scaling.json holds; `holdout` > 0 refits without the `holdout` largest-compute runs, and
    `target_flops` asks for the compute-optimal N and D of that budget."""
    if holdout and len(points) - holdout < MIN_RUNS:
        raise ScalingError(f"--holdout {holdout} leaves {len(points) - holdout} runs; the fit needs at least"
                           f" {MIN_RUNS}")
    fewshot = choose_fewshot_k(points, fewshot_k)  # first: a k no run has fails before the fitting
    parameters, tokens, losses = (np.array([getattr(point, key) for point in points]) for key in CSV_COLUMNS)
    law = fit_law(parameters, tokens, losses)
    refits = bootstrap(parameters, tokens, losses, law, samples=samples, seed=seed)
    isoflop = isoflop_profiles(points, samples, seed)
    return ScalingReport(
        law=law,
        intervals_95=constant_intervals(refits),
        bootstrap_samples=len(refits),
        runs=[FittedRun(point, float(law.loss(point.parameters, point.tokens))) for point in points],
        isoflop=isoflop,
        fewshot=fewshot,
        holdout=_holdout(points, parameters, tokens, losses, holdout) if holdout else None,
        compute_optimal=_compute_optimal(law, refits, target_flops, isoflop) if target_flops else None,
    )


def format_interval(interval_95: Interval | None) -> str:
    """` [low, high]` to 3 significant digits, or nothing where no bootstrap resampling gave an interval."""
    return f" [{interval_95[0]:.3g}, {interval_95[1]:.3g}]" if interval_95 else ""


def summary_lines(report: ScalingReport) -> list[str]:
    """The report as the command prints it."""
    lines = [f"{len(report.runs)} runs; L(N, D) = E + A / N^alpha + B / D^beta, 95% bootstrap intervals:"]
    for name, value in asdict(report.law).items():
        low, high = getattr(report.intervals_95, name)
        lines.append(f"  {name:6s} {value:12.5g}  [{low:.5g}, {high:.5g}]")
    if report.holdout:
        errors = ", ".join(f"{error:+.2%}" for error in report.holdout.relative_errors)
        lines.append(f"holdout: fitted without {', '.join(report.holdout.held_out)}, predicted them with errors"
                     f" {errors}")
    if best := report.compute_optimal:
        lines.append(f"compute-optimal at {best.flops:.3g} FLOPs: N {best.parameters:.3g}"
                     f"{format_interval(best.parameters_interval_95)}, D {best.tokens:.3g}"
                     f"{format_interval(best.tokens_interval_95)}, loss {best.loss:.4g}")
        if split := best.isoflop:
            lines.append(f"  from the isoFLOP power law: N {split.parameters:.3g}"
                         f"{format_interval(split.parameters_interval_95)}, D {split.tokens:.3g}"
                         f"{format_interval(split.tokens_interval_95)}")
    for budget in report.isoflop.budgets:
        optimum = budget.optimum
        about = (f"skipped: {budget.skipped}" if optimum is None else
                 f"N_opt {optimum.optimal_parameters:.3g}{format_interval(optimum.optimal_parameters_interval_95)},"
                 f" loss {optimum.loss_at_optimum:.4g}")
        lines.append(f"isoFLOP budget {budget.flops:.3g} FLOPs ({len(budget.runs)} runs): {about}")
    if power_law := report.isoflop.power_law:
        lines.append(f"isoFLOP power law through the budgets' minima: N_opt ∝ C^{power_law.parameters_exponent:.3f}"
                     f"{format_interval(power_law.parameters_exponent_interval_95)}, D_opt ∝"
                     f" C^{power_law.tokens_exponent:.3f}{format_interval(power_law.tokens_exponent_interval_95)}")
    else:
        lines.append(f"isoFLOP: skipped: {report.isoflop.skipped}")
    if report.fewshot.k is not None:
        lines.append(f"few-shot accuracy against compute at k={report.fewshot.k}: {', '.join(report.fewshot.tasks)}")
    return lines
