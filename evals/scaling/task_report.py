"""A task-scaling analysis as one `TaskScalingReport`: both steps fitted for each task and k, their chain's
prediction for each target with a bootstrap interval over runs, and a held-out check. `to_json` is
task_scaling.json; `summary_lines` is the table the command prints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from evals.scaling.law import Interval, interval_or_none, one_blas_thread
from evals.scaling.loss_report import format_interval
from evals.scaling.points import ScalingError
from evals.scaling.task_law import TaskFit, final_points, fit_task, last_tokens
from evals.scaling.task_points import Target, TaskPoint

# How far past the ladder a target may lie, in N and in D, either way: a power law extrapolated further says
# nothing (Bhagia et al. predict 7B and 13B models from a ladder of up to 1.3B: 5 to 10x in N).
FURTHEST_EXTRAPOLATION = 1000.0


@dataclass(frozen=True)
class Prediction:
    """One target's task loss and accuracy at one task and k, each with its 95% bootstrap interval (None where
    no resampling of the runs could be fitted)."""

    target: str
    parameters: float
    tokens: float
    task: str
    shots: int
    task_loss: float
    task_loss_interval: Interval | None
    accuracy: float
    accuracy_interval: Interval | None


@dataclass(frozen=True)
class HeldOutError:
    """One held-out run's final checkpoint at one task and k: measured against predicted without it."""

    run: str
    task: str
    shots: int
    task_loss: float
    predicted_task_loss: float
    accuracy: float
    predicted_accuracy: float


@dataclass(frozen=True)
class Holdout:
    held_out: list[str]  # the runs of the largest model size
    parameters: float
    errors: list[HeldOutError]


@dataclass(frozen=True)
class TaskScalingReport:
    fits: list[TaskFit]
    targets: list[Target]
    predictions: list[Prediction]
    bootstrap_samples: int  # resamplings of the runs that gave a fit of every task and k
    points: list[TaskPoint]
    holdout: Holdout | None = None

    def to_json(self) -> dict:
        """task_scaling.json, its keys in their order."""
        result = {
            "fits": [{"task": fit.task, "shots": fit.shots, "runs": fit.runs, "checkpoints": fit.checkpoints,
                      "task_loss_law": asdict(fit.law), "accuracy_sigmoid": asdict(fit.sigmoid)}
                     for fit in self.fits],
            "targets": [asdict(target) for target in self.targets],
            "predictions": [asdict(prediction) for prediction in self.predictions],
            "bootstrap_samples": self.bootstrap_samples,
        }
        if self.holdout is not None:
            result["holdout"] = asdict(self.holdout)
        return result


def _groups(points: list[TaskPoint]) -> dict[tuple[str, int], list[TaskPoint]]:
    groups: dict[tuple[str, int], list[TaskPoint]] = {}
    for point in points:
        groups.setdefault((point.task, point.shots), []).append(point)
    return dict(sorted(groups.items()))


def check_runs(points: list[TaskPoint]) -> None:
    """Refuse a run name that stands for two models (two run directories with one name, or a CSV's rows)."""
    sizes: dict[str, float] = {}
    for point in points:
        if sizes.setdefault(point.run, point.parameters) != point.parameters:
            raise ScalingError(f"run {point.run}: has points with N = {sizes[point.run]:.6g} and N ="
                               f" {point.parameters:.6g}; give each run its own name")


def check_targets(targets: list[Target], parameters: list[float], tokens: list[float]) -> None:
    """Refuse a target that is not a model, one further from the ladder's runs (their `parameters` and final
    `tokens`) than FURTHEST_EXTRAPOLATION, and two targets of one name."""
    names = [target.name for target in targets]
    if len(set(names)) < len(names):
        raise ScalingError(f"targets: {', '.join(names)}: two targets share a name; give each its own")
    for target in targets:
        for what, value, seen in (("N", target.parameters, parameters), ("D", target.tokens, tokens)):
            if not (math.isfinite(value) and value >= 1):
                raise ScalingError(f"target {target.name}: {what} = {value:g} is not a positive count; give the"
                                   " parameters (without embeddings) and tokens of the model to predict")
            if not min(seen) / FURTHEST_EXTRAPOLATION <= value <= max(seen) * FURTHEST_EXTRAPOLATION:
                raise ScalingError(
                    f"target {target.name}: {what} = {value:.3g} is more than {FURTHEST_EXTRAPOLATION:g}x outside"
                    f" the ladder's {min(seen):.3g} to {max(seen):.3g}, too far for a fit to say anything; give a"
                    " target nearer the ladder or train a larger ladder")


def _fit_all(points: list[TaskPoint], start: dict | None = None) -> dict[tuple[str, int], TaskFit]:
    """Both steps for every task and k of the points, each run's final checkpoint being its last over all."""
    last = last_tokens(points)
    return {key: fit_task(group, start[key] if start else None, last) for key, group in _groups(points).items()}


def points_by_run(points: list[TaskPoint]) -> dict[str, list[TaskPoint]]:
    """Each run's points, the runs in sorted order (the order a resampling draws from)."""
    by_run: dict[str, list[TaskPoint]] = {}
    for point in points:
        by_run.setdefault(point.run, []).append(point)
    return dict(sorted(by_run.items()))


def resampled(by_run: dict[str, list[TaskPoint]], rng: np.random.Generator) -> list[TaskPoint]:
    """The points of runs drawn with replacement, a run drawn twice appearing twice (under two names)."""
    runs = list(by_run)
    drawn = rng.choice(len(runs), size=len(runs), replace=True)
    return [replace(point, run=f"{runs[index]}#{draw}") for draw, index in enumerate(drawn)
            for point in by_run[runs[index]]]


def _holdout(points: list[TaskPoint]) -> Holdout:
    largest = max(point.parameters for point in points)
    held = sorted({point.run for point in points if point.parameters == largest})
    try:
        fits = _fit_all([point for point in points if point.parameters != largest])
    except ScalingError as error:
        raise ScalingError(f"--holdout largest: without the {len(held)} run(s) of N = {largest:.6g}, {error}") from None
    errors = []
    for final in sorted(final_points([p for p in points if p.run in held]), key=lambda p: (p.task, p.shots)):
        if fit := fits.get((final.task, final.shots)):
            errors.append(HeldOutError(final.run, final.task, final.shots, final.task_loss,
                                       float(fit.task_loss(final.parameters, final.tokens)), final.accuracy,
                                       float(fit.accuracy(final.parameters, final.tokens))))
    return Holdout(held, largest, errors)


@one_blas_thread
def analyse_tasks(points: list[TaskPoint], targets: list[Target], samples: int = 200, holdout: bool = False,
                  seed: int = 0) -> TaskScalingReport:
    """Both steps for each task and k, each target's predictions with 95% intervals from `samples` resamplings
    of the runs, and with `holdout` the errors predicting the runs of the largest size from the others."""
    # In one order whatever the input's (a CSV's rows, run directories), so that the same points give one fit.
    points = sorted(points, key=lambda point: (point.run, point.tokens, point.task, point.shots))
    check_runs(points)
    finals = final_points(points)
    check_targets(targets, [p.parameters for p in finals], [p.tokens for p in finals])
    fits = _fit_all(points)
    by_run = points_by_run(points)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(samples):
        try:
            refitted = _fit_all(resampled(by_run, rng), fits)
        except ScalingError:
            continue  # a resampling without 2 sizes, 2 budgets or 5 runs cannot be fitted
        if refitted.keys() == fits.keys():  # else it lacks the only runs that evaluated some task or k
            refits.append(refitted)
    predictions = []
    for target in targets:
        for key, fit in fits.items():
            losses = [float(refit[key].task_loss(target.parameters, target.tokens)) for refit in refits]
            accuracies = [float(refit[key].accuracy(target.parameters, target.tokens)) for refit in refits]
            predictions.append(Prediction(
                target.name, target.parameters, target.tokens, fit.task, fit.shots,
                float(fit.task_loss(target.parameters, target.tokens)), interval_or_none(losses),
                float(fit.accuracy(target.parameters, target.tokens)), interval_or_none(accuracies)))
    return TaskScalingReport(list(fits.values()), targets, predictions, len(refits), points,
                             _holdout(points) if holdout else None)


def summary_lines(report: TaskScalingReport) -> list[str]:
    """The report as the command prints it."""
    runs = {point.run for point in report.points}
    sizes = {point.parameters for point in report.points}
    lines = [f"{len(runs)} runs of {len(sizes)} sizes, {len(report.points)} evaluated checkpoints x tasks x k;"
             f" intervals: 95%, {report.bootstrap_samples} resamplings of the runs",
             "step 1, task loss L = E + A / N^alpha + B / D^beta; step 2, accuracy = a / (1 + exp(-s (L - L0))) + b:"]
    for fit in report.fits:
        law, sigmoid = fit.law, fit.sigmoid
        lines.append(f"  {fit.task} k={fit.shots}: E {law.E:.4g}, A {law.A:.4g}, alpha {law.alpha:.3g}, B {law.B:.4g},"
                     f" beta {law.beta:.3g}; a {sigmoid.a:.3g}, s {sigmoid.s:.3g}, L0 {sigmoid.L0:.4g},"
                     f" b {sigmoid.b:.3g}")
    width = max([len(fit.task) for fit in report.fits] + [4])
    for target in report.targets:
        lines.append(f"target {target.name} (N {target.parameters:.4g}, D {target.tokens:.4g}), predicted:")
        lines.append(f"  {'task':{width}s} {'k':>3s}  {'task loss [95%]':>26s}  {'accuracy [95%]':>24s}")
        for found in report.predictions:
            if found.target == target.name:
                loss = f"{found.task_loss:.4f}{format_interval(found.task_loss_interval)}"
                accuracy = f"{found.accuracy:.3f}{format_interval(found.accuracy_interval)}"
                lines.append(f"  {found.task:{width}s} {found.shots:3d}  {loss:>26s}  {accuracy:>24s}")
    if holdout := report.holdout:
        lines.append(f"holdout: fitted without the runs of N = {holdout.parameters:.6g}; measured -> predicted")
        for error in holdout.errors:
            lines.append(f"  {error.run} {error.task} k={error.shots}: task loss {error.task_loss:.4f} ->"
                         f" {error.predicted_task_loss:.4f}, accuracy {error.accuracy:.3f} ->"
                         f" {error.predicted_accuracy:.3f} ({error.predicted_accuracy - error.accuracy:+.3f})")
    return lines
