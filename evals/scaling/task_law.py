"""The two steps of a task-scaling fit, after Bhagia et al. (2024, "Establishing Task Scaling Laws via
Compute-Efficient Model Ladders"), for one task at one k:

1. the task loss as L(N, D) = E + A / N^alpha + B / D^beta, fitted (as the loss is, `evals.scaling.law`) to the
   final checkpoint of each run of the ladder;
2. the accuracy as a sigmoid of the task loss, acc = a / (1 + exp(-s (L - L0))) + b, fitted by least squares to
   every evaluated checkpoint of every run (s < 0: accuracy falls as the loss rises, from a + b to b).

Chained, they predict a model's accuracy from its N and D alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from evals.scaling.law import Law, fit_law, one_blas_thread, refit, separates_size_from_budget
from evals.scaling.points import ScalingError
from evals.scaling.task_points import TaskPoint

# The steepest sigmoid fitted, in 1 / (bits per byte): a jump from b to a + b over about 0.01 bits per byte. An
# in-context skill can appear that abruptly; a bound keeps a fit to a cloud without a slope from running off.
STEEPEST = 500.0
LOWEST_VARIATION = 1e-6  # relative spread of the final task losses under which they "do not vary"


@dataclass(frozen=True)
class Sigmoid:
    a: float  # the rise from the floor to the ceiling
    s: float  # the slope, negative: accuracy falls as the task loss rises
    L0: float  # the task loss at the midpoint
    b: float  # the floor (about chance)

    def accuracy(self, task_loss):
        """The accuracy at `task_loss`, held within [0, 1] (a + b may exceed 1 a little where no run reaches it)."""
        return np.clip(self.a * logistic(self.s * (np.asarray(task_loss, dtype=float) - self.L0)) + self.b, 0.0, 1.0)


def logistic(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), written with tanh so that no x overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _residuals(theta: np.ndarray, losses: np.ndarray, accuracies: np.ndarray) -> np.ndarray:
    a, s, midpoint, b = theta
    return a * logistic(s * (losses - midpoint)) + b - accuracies


def _sigmoid_bounds(losses: np.ndarray) -> tuple[list[float], list[float]]:
    spread = max(losses.max() - losses.min(), 1e-3)
    return [0.0, -STEEPEST, losses.min() - spread, 0.0], [1.0, 0.0, losses.max() + spread, 1.0]


def fit_sigmoid(losses, accuracies, start: Sigmoid | None = None) -> Sigmoid:
    """The sigmoid of least squares through (task loss, accuracy) points: from `start` alone where given (a
    bootstrap refit), else from a grid of midpoints and slopes, the best kept."""
    losses, accuracies = np.asarray(losses, dtype=float), np.asarray(accuracies, dtype=float)
    lower, upper = _sigmoid_bounds(losses)
    if start is not None:
        starts = [np.array([start.a, start.s, start.L0, start.b])]
    else:
        spread = max(losses.max() - losses.min(), 1e-3)
        rise, floor = max(accuracies.max() - accuracies.min(), 1e-3), accuracies.min()
        starts = [np.array([rise, -slope / spread, midpoint, floor]) for midpoint, slope in itertools.product(
            np.quantile(losses, [0.1, 0.3, 0.5, 0.7, 0.9]), (1.0, 4.0, 16.0, 64.0))]
    # deferred: scipy takes half a second to import, which every launch would pay (the launcher imports the sweep)
    from scipy.optimize import least_squares

    fits = [least_squares(_residuals, np.clip(theta, lower, upper), bounds=(lower, upper), args=(losses, accuracies))
            for theta in starts]
    best = min(fits, key=lambda fit: fit.cost)
    return Sigmoid(*(float(value) for value in best.x))


@dataclass(frozen=True)
class TaskFit:
    """Both steps for one task at one k, and what they were fitted to."""

    task: str
    shots: int
    law: Law  # step 1: the task loss from N and D
    sigmoid: Sigmoid  # step 2: the accuracy from the task loss
    runs: int
    checkpoints: int

    def task_loss(self, parameters, tokens):
        return self.law.loss(parameters, tokens)

    def accuracy(self, parameters, tokens):
        return self.sigmoid.accuracy(self.task_loss(parameters, tokens))


def last_tokens(points: list[TaskPoint]) -> dict[str, float]:
    """Each run's final checkpoint, as the tokens seen there (the most among its points)."""
    last: dict[str, float] = {}
    for point in points:
        last[point.run] = max(last.get(point.run, 0.0), point.tokens)
    return last


def final_points(points: list[TaskPoint], last: dict[str, float] | None = None) -> list[TaskPoint]:
    """The points at each run's final checkpoint (`last`, by default found among `points`), in their order."""
    last = last or last_tokens(points)
    return [point for point in points if point.tokens == last[point.run]]


@one_blas_thread
def fit_task(points: list[TaskPoint], start: TaskFit | None = None, last: dict[str, float] | None = None) -> TaskFit:
    """Step 1 on the final checkpoint of each run (`last`: each run's, found among all of its points; a run whose
    final checkpoint lacks this task or k is left out of step 1), step 2 on every point: the points of one task
    at one k. With `start` (the fit to all the runs), each step is refitted from it alone, as a bootstrap refit
    is."""
    task, shots = points[0].task, points[0].shots
    finals = final_points(points, last)
    parameters, tokens, losses = (np.array([getattr(point, key) for point in finals], dtype=float)
                                  for key in ("parameters", "tokens", "task_loss"))
    if not separates_size_from_budget(parameters, tokens):
        raise ScalingError(f"{task} k={shots}: the runs' final checkpoints have {len(np.unique(parameters))} model"
                           f" size(s) and {len(np.unique(tokens))} token budget(s); the fit needs at least 2 of each,"
                           " not all at one ratio of tokens to parameters, to separate N from D")
    if (losses.max() - losses.min()) <= LOWEST_VARIATION * losses.mean():
        raise ScalingError(f"{task} k={shots}: the task loss is {losses.mean():.6g} bits per byte in every run, so"
                           " it does not vary across the ladder and nothing can be fitted to it; drop the task or"
                           " check that its evaluation reads the model")
    try:
        law = refit(parameters, tokens, losses, start.law) if start else fit_law(parameters, tokens, losses)
    except ScalingError as error:
        raise ScalingError(f"{task} k={shots}: {error}") from None
    sigmoid = fit_sigmoid([point.task_loss for point in points], [point.accuracy for point in points],
                          start.sigmoid if start else None)
    return TaskFit(task, shots, law, sigmoid, runs=len(finals), checkpoints=len(points))
