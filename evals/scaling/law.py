"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted as Hoffmann et al. (2022, appendix D.2) do.

The Huber loss (delta 1e-3) between the log of the predicted and the observed loss is minimised by L-BFGS from a
grid of starting values (here: from the grid points where the objective is lowest), the best minimum kept. It is
parametrised as a = log A, b = log B, e = log E, so the prediction is logsumexp(a - alpha log N, b - beta log D, e).
Bootstrap intervals refit on runs resampled with replacement, each refit starting from the full fit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
from threadpoolctl import threadpool_limits

from evals.scaling.points import ScalingError

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starting points, thinned: the Huber objective has local minima, and the grid
# is what makes the fit land in the right one.
START_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.0, 0.5, 1.0, 2.0),
    "beta": (0.0, 0.5, 1.0, 2.0),
}
# Wide bounds on (a, b, e, alpha, beta): they keep a fit to runs that do not yet show the loss levelling off
# from sending E to 0 (e to minus infinity), from where no bootstrap refit could move.
BOUNDS = [(-10.0, 40.0), (-10.0, 40.0), (-10.0, 5.0), (0.0, 5.0), (0.0, 5.0)]

Interval = tuple[float, float]  # (low, high) of a central bootstrap percentile interval

# For a function that fits: BLAS on one thread. L-BFGS-B's many tiny BLAS calls each wake every BLAS thread, and
# on cores busy with training that made one fit 10 times slower.
one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, parameters, tokens):
        return self.E + self.A / np.power(parameters, self.alpha) + self.B / np.power(tokens, self.beta)

    def compute_optimal(self, flops):
        """The (N, D) with the lowest predicted loss for a budget of `flops` = 6 N D (Hoffmann et al., eq. 4)."""
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        parameters = scale * np.power(np.asarray(flops, dtype=float) / 6, self.beta / (self.alpha + self.beta))
        return parameters, np.asarray(flops, dtype=float) / (6 * parameters)


@dataclass(frozen=True)
class ConstantIntervals:
    """The 95% bootstrap interval of each constant of a `Law`."""

    E: Interval
    A: Interval
    B: Interval
    alpha: Interval
    beta: Interval


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """The summed Huber loss of the log-loss residuals, and its gradient in (a, b, e, alpha, beta). Both are
    divided by delta (the minimum stays where it is), so that the gradient is of order one and L-BFGS does not
    stop early on an objective whose values are all tiny."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = np.logaddexp.reduce(terms, axis=0)  # numpy's: scipy's logsumexp costs 10x more per call
    residual = predicted - log_loss
    weights = np.exp(terms - predicted)  # d predicted / d term
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA  # d huber / d residual, over delta
    gradient = np.array([
        np.sum(slope * weights[0]),
        np.sum(slope * weights[1]),
        np.sum(slope * weights[2]),
        np.sum(slope * weights[0] * -log_n),
        np.sum(slope * weights[1] * -log_d),
    ])
    size = np.abs(residual)
    huber = np.where(size <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA))
    return float(np.sum(huber)) / HUBER_DELTA, gradient


def _check(parameters, tokens, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(values, dtype=float) for values in (parameters, tokens, losses)]
    if len({array.shape for array in arrays}) != 1 or arrays[0].ndim != 1:
        raise ScalingError("parameters, tokens and losses must be lists of the same length")
    if len(arrays[0]) < 5:
        raise ScalingError(f"{len(arrays[0])} runs: a law of 5 constants needs at least 5 runs, and many more to trust")
    if not all(np.all(np.isfinite(array)) and np.all(array > 0) for array in arrays):
        raise ScalingError("every parameter count, token count and loss must be a positive finite number")
    if not separates_size_from_budget(arrays[0], arrays[1]):
        raise ScalingError("the runs need at least 2 model sizes and 2 token budgets, not all at one ratio of tokens"
                           " to parameters, to separate N from D")
    return arrays[0], arrays[1], arrays[2]


def _minimise(start: np.ndarray, data: tuple[np.ndarray, np.ndarray, np.ndarray]):
    # deferred: scipy takes half a second to import, which every launch would pay (the launcher imports the sweep)
    from scipy.optimize import minimize

    return minimize(_objective, start, args=data, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                    options={"maxiter": 10_000, "ftol": 1e-14, "gtol": 1e-10})


def _law(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


@one_blas_thread
def fit_law(parameters, tokens, losses, refined_starts: int = 32) -> Law:
    """The law that best fits the runs: the objective at every grid start, L-BFGS from the `refined_starts`
    best of them, and the lowest minimum kept."""
    parameters, tokens, losses = _check(parameters, tokens, losses)
    data = (np.log(parameters), np.log(tokens), np.log(losses))
    starts = np.array(list(itertools.product(*START_GRID.values())))
    ranked = starts[np.argsort([_objective(start, *data)[0] for start in starts])]
    best = min((_minimise(start, data) for start in ranked[:refined_starts]), key=lambda result: result.fun)
    return _law(best.x)


def refit(parameters, tokens, losses, start: Law) -> Law:
    """The law fitted to the runs by L-BFGS from `start` alone (a fit to runs much like those `start` fits)."""
    parameters, tokens, losses = _check(parameters, tokens, losses)
    return _law(_minimise(_theta(start), (np.log(parameters), np.log(tokens), np.log(losses))).x)


def separates_size_from_budget(parameters, tokens) -> bool:
    """Whether runs can tell N from D: 2 model sizes, 2 token budgets, and (log N, log D) not on one line, as
    they are when every run trains on the same tokens per parameter (steps rounded up move D off it by less
    than the tolerance here)."""
    if len(np.unique(parameters)) < 2 or len(np.unique(tokens)) < 2:
        return False
    centred = np.column_stack([np.log(parameters), np.log(tokens)])
    singular = np.linalg.svd(centred - centred.mean(axis=0), compute_uv=False)
    return bool(singular[-1] > 1e-3 * singular[0])


@one_blas_thread
def bootstrap(parameters, tokens, losses, law: Law, samples: int = 200, seed: int = 0) -> list[Law]:
    """Laws refitted to `samples` resamplings of the runs (with replacement), each started from `law`."""
    parameters, tokens, losses = _check(parameters, tokens, losses)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(samples):
        chosen = rng.integers(0, len(losses), len(losses))
        if not separates_size_from_budget(parameters[chosen], tokens[chosen]):
            continue
        refits.append(refit(parameters[chosen], tokens[chosen], losses[chosen], law))
    return refits


def interval(values, level: float = 0.95) -> Interval:
    """The central `level` percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def interval_or_none(values) -> Interval | None:
    """The 95% interval of bootstrap values, or None where no resampling gave one."""
    return interval(values) if len(values) else None


def constant_intervals(refits: list[Law], level: float = 0.95) -> ConstantIntervals:
    return ConstantIntervals(**{field.name: interval([getattr(law, field.name) for law in refits], level)
                                for field in fields(Law)})
