"""IsoFLOP profiles, Hoffmann et al.'s approach 2: a model-free estimate of the compute-optimal model size.

Where a sweep trains several sizes at each of a few fixed budgets, a parabola of loss against log10 N per
budget has its minimum at that budget's N_opt, and a power law N_opt = k C^a goes through those minima.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from evals.scaling.law import Interval, interval_or_none
from evals.scaling.points import RunPoint

# Step counts are rounded, so the runs of one compute budget differ by a few percent; a factor of 1.25 keeps
# them together while keeping apart the budgets of a sweep, which are usually a factor of 2 or more apart.
BUDGET_TOLERANCE = 1.25
BUDGET_RULE = (f"runs sorted by C = 6 N D; a budget holds the cheapest run not yet in one and every run within a"
               f" factor {BUDGET_TOLERANCE} of it; its flops are the geometric mean of their 6 N D")
ISOFLOP_MIN_SIZES = 3  # a parabola through fewer sizes always fits exactly: no evidence of a minimum


@dataclass(frozen=True)
class Split:
    """The compute-optimal N and D of one budget, with their 95% intervals (None where no resampling gave one)."""

    parameters: float
    tokens: float
    parameters_interval_95: Interval | None
    tokens_interval_95: Interval | None


@dataclass(frozen=True)
class BudgetOptimum:
    """The minimum of one budget's parabola."""

    optimal_parameters: float
    optimal_parameters_interval_95: Interval | None
    optimal_tokens: float
    loss_at_optimum: float
    bootstrap_samples: int


@dataclass(frozen=True)
class IsoflopBudget:
    """One compute budget's runs and parabola: its `optimum`, or why it has none (`skipped`)."""

    flops: float
    runs: list[str]
    parameters: list[float]
    losses: list[float]
    parabola: list[float]  # loss = c2 x^2 + c1 x + c0 in x = log10 N
    skipped: str | None = None
    optimum: BudgetOptimum | None = None

    def to_json(self) -> dict:
        drawn = {key: value for key, value in asdict(self).items() if key not in ("skipped", "optimum")}
        return {**drawn, "skipped": self.skipped} if self.optimum is None else {**drawn, **asdict(self.optimum)}


@dataclass(frozen=True)
class IsoflopPowerLaw:
    """log10 N_opt = a log10 C + b through the budgets' minima: N_opt = k C^a and D_opt = C / (6 N_opt) ∝ C^(1-a)."""

    parameters_exponent: float
    parameters_exponent_interval_95: Interval | None
    tokens_exponent: float
    tokens_exponent_interval_95: Interval | None
    parameters_coefficient: float
    bootstrap_samples: int
    intercept: float  # b
    resampled_lines: list[tuple[float, float]]  # (a, b) of each resampling that gave every budget a minimum

    def split_at(self, flops: float) -> Split:
        """The N_opt and D_opt the power law gives a budget of `flops`, with intervals from the resamplings."""
        parameters = float(10 ** (self.parameters_exponent * np.log10(flops) + self.intercept))
        resampled = [10 ** (a * np.log10(flops) + b) for a, b in self.resampled_lines]
        return Split(parameters, flops / (6 * parameters), interval_or_none(resampled),
                     interval_or_none([flops / (6 * n) for n in resampled]))

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in ("intercept", "resampled_lines")}


@dataclass(frozen=True)
class IsoflopProfiles:
    """Every budget with runs of enough sizes, and the power law through their minima, or why there is none."""

    budget_rule: str
    budgets: list[IsoflopBudget]
    skipped: str | None = None
    power_law: IsoflopPowerLaw | None = None

    @property
    def usable_budgets(self) -> int:
        return sum(budget.optimum is not None for budget in self.budgets)

    def to_json(self) -> dict:
        result = {"budget_rule": self.budget_rule, "budgets": [budget.to_json() for budget in self.budgets]}
        if self.power_law is None:
            return {**result, "skipped": self.skipped}
        return {**result, **self.power_law.to_json()}


def compute_budgets(points: list[RunPoint]) -> list[list[RunPoint]]:
    """The runs grouped into compute budgets, cheapest first, as BUDGET_RULE says."""
    budgets: list[list[RunPoint]] = []
    for point in sorted(points, key=lambda point: point.nominal_compute):
        if budgets and point.nominal_compute <= budgets[-1][0].nominal_compute * BUDGET_TOLERANCE:
            budgets[-1].append(point)
        else:
            budgets.append([point])
    return budgets


def _parabola_minimum(log_parameters: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, float | None, str | None]:
    """The parabola loss = c2 x^2 + c1 x + c0 in x = log10 N through one budget's runs, the x of its minimum,
    and, where it has none among the sizes trained, why not."""
    parabola = np.polyfit(log_parameters, losses, 2)
    if parabola[0] <= 0:
        return parabola, None, "the parabola opens downwards: the loss does not rise on both sides of a best size"
    vertex = -parabola[1] / (2 * parabola[0])
    smallest, largest = log_parameters.min(), log_parameters.max()
    if not smallest <= vertex <= largest:
        return parabola, None, (f"the parabola's minimum, N = {10 ** vertex:.3g}, lies outside the sizes trained"
                                f" ({10 ** smallest:.3g} to {10 ** largest:.3g}): train"
                                f" {'larger' if vertex > largest else 'smaller'} models at this budget")
    return parabola, float(vertex), None


def isoflop_profiles(points: list[RunPoint], samples: int = 200, seed: int = 0) -> IsoflopProfiles:
    """For every compute budget (see BUDGET_RULE) with runs of at least 3 sizes, a parabola of loss against
    log10 N, whose minimum is the budget's N_opt; through the budgets' minima the power law log10 N_opt =
    a log10 C + b (least squares), C being 6 N D throughout (see `RunPoint.nominal_compute`). Intervals come
    from refits to the runs resampled (with replacement) within each budget: a budget's from the resamplings
    that give it a minimum, the power law's from those that give every budget one.

    Nothing here raises: a budget without a minimum among its sizes, or a power law with fewer than 2 budgets to
    go through, is reported with the reason it was skipped."""
    groups = [group for group in compute_budgets(points)
              if len({point.parameters for point in group}) >= ISOFLOP_MIN_SIZES]
    if not groups:
        return IsoflopProfiles(BUDGET_RULE, [], skipped=(
            f"no compute budget has runs of {ISOFLOP_MIN_SIZES} or more model sizes; isoFLOP profiles need a sweep"
            " that trains several sizes at each of a few fixed budgets"))
    fitted = []  # (group, flops, parabola, vertex, why skipped) of each budget
    profiles = []  # (log10 N, losses) of the budgets with a minimum
    for group in groups:
        log_parameters = np.log10([point.parameters for point in group])
        losses = np.array([point.loss for point in group])
        parabola, vertex, problem = _parabola_minimum(log_parameters, losses)
        flops = float(np.exp(np.mean(np.log([point.nominal_compute for point in group]))))
        fitted.append((group, flops, parabola.tolist(), vertex, problem))
        if not problem:
            profiles.append((log_parameters, losses))

    log_flops = np.log10([flops for _, flops, _, _, problem in fitted if not problem])
    rng = np.random.default_rng(seed)
    resampled_vertices: list[list[float]] = [[] for _ in profiles]
    resampled_lines = []  # (a, b) of each resampling that gives every budget a minimum
    for _ in range(samples):
        vertices = []
        for log_parameters, losses in profiles:
            chosen = rng.integers(0, len(losses), len(losses))
            enough_sizes = len(np.unique(log_parameters[chosen])) >= ISOFLOP_MIN_SIZES
            vertices.append(_parabola_minimum(log_parameters[chosen], losses[chosen])[1] if enough_sizes else None)
        for kept, vertex in zip(resampled_vertices, vertices):
            if vertex is not None:
                kept.append(vertex)
        if len(profiles) >= 2 and None not in vertices:
            resampled_lines.append(np.polyfit(log_flops, vertices, 1))

    budgets = []
    kept_vertices = iter(resampled_vertices)
    for group, flops, parabola, vertex, problem in fitted:
        optimum = None
        if not problem:
            kept = next(kept_vertices)
            optimum = BudgetOptimum(10 ** vertex, interval_or_none(np.power(10, kept)), flops / (6 * 10 ** vertex),
                                    float(np.polyval(parabola, vertex)), len(kept))
        budgets.append(IsoflopBudget(flops, [point.name for point in group], [point.parameters for point in group],
                                     [point.loss for point in group], parabola, problem, optimum))
    if len(profiles) < 2:
        return IsoflopProfiles(BUDGET_RULE, budgets, skipped=(
            f"{len(profiles)} compute budget(s) with a minimum among the sizes trained; the power law"
            " N_opt = k C^a needs at least 2"))
    exponent, intercept = np.polyfit(log_flops, [vertex for *_, vertex, problem in fitted if not problem], 1)
    power_law = IsoflopPowerLaw(
        parameters_exponent=float(exponent),
        parameters_exponent_interval_95=interval_or_none([a for a, _ in resampled_lines]),
        tokens_exponent=float(1 - exponent),
        tokens_exponent_interval_95=interval_or_none([1 - a for a, _ in resampled_lines]),
        parameters_coefficient=float(10 ** intercept),
        bootstrap_samples=len(resampled_lines),
        intercept=float(intercept),
        resampled_lines=[(float(a), float(b)) for a, b in resampled_lines],
    )
    return IsoflopProfiles(BUDGET_RULE, budgets, power_law=power_law)
