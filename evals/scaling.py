"""Scaling laws fitted to a ladder of runs: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals.

The fit follows Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models", appendix D.2): the
Huber loss (delta 1e-3) between the log of the predicted and the observed loss, minimised by L-BFGS from a
grid of starting values (here: from the grid points where the objective is lowest), the best minimum kept.
It is parametrised as a = log A, b = log B, e = log E, so the prediction is
logsumexp(a - alpha log N, b - beta log D, e). Bootstrap intervals refit on
runs resampled with replacement, each refit starting from the full fit.

N is the number of parameters (without embeddings, as the ladder reports it), D the number of training tokens,
and a training run costs about C = 6 N D FLOPs, which gives the compute-optimal split of a budget C.

Where a sweep trains several sizes at each of a few fixed budgets, the isoFLOP profiles (Hoffmann et al.'s
"approach 2") give a second, model-free estimate: a parabola of loss against log10 N per budget, whose minimum is
that budget's N_opt, and a power law N_opt = k C^a through those minima (`isoflop_profiles`). The report also
holds the runs' few-shot accuracy at one k, which `plot` draws against compute, and `log_to_wandb` sends the fit,
its plots and the runs to a summary run in the sweep's W&B group.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

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


class ScalingError(Exception):
    """Runs a law cannot be fitted to; the message says what is missing."""


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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """The summed Huber loss of the log-loss residuals, and its gradient in (a, b, e, alpha, beta). Both are
    divided by delta (the minimum stays where it is), so that the gradient is of order one and L-BFGS does not
    stop early on an objective whose values are all tiny."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = logsumexp(terms, axis=0)
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
    return float(np.sum(huber(HUBER_DELTA, residual))) / HUBER_DELTA, gradient


def _check(parameters, tokens, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(values, dtype=float) for values in (parameters, tokens, losses)]
    if len({array.shape for array in arrays}) != 1 or arrays[0].ndim != 1:
        raise ScalingError("parameters, tokens and losses must be lists of the same length")
    if len(arrays[0]) < 5:
        raise ScalingError(f"{len(arrays[0])} runs: a law of 5 constants needs at least 5 runs, and many more to trust")
    if not all(np.all(np.isfinite(array)) and np.all(array > 0) for array in arrays):
        raise ScalingError("every parameter count, token count and loss must be a positive finite number")
    if len(np.unique(arrays[0])) < 2 or len(np.unique(arrays[1])) < 2:
        raise ScalingError("the runs need at least 2 model sizes and 2 token budgets to separate N from D")
    return arrays[0], arrays[1], arrays[2]


# Wide bounds on (a, b, e, alpha, beta): they keep a fit to runs that do not yet show the loss levelling off
# from sending E to 0 (e to minus infinity), from where no bootstrap refit could move.
BOUNDS = [(-10.0, 40.0), (-10.0, 40.0), (-10.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


def _minimise(start: np.ndarray, data: tuple[np.ndarray, np.ndarray, np.ndarray]):
    return minimize(_objective, start, args=data, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                    options={"maxiter": 10_000, "ftol": 1e-14, "gtol": 1e-10})


def _law(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def fit_law(parameters, tokens, losses, refined_starts: int = 32) -> Law:
    """The law that best fits the runs: the objective at every grid start, L-BFGS from the `refined_starts`
    best of them, and the lowest minimum kept."""
    parameters, tokens, losses = _check(parameters, tokens, losses)
    data = (np.log(parameters), np.log(tokens), np.log(losses))
    starts = np.array(list(itertools.product(*START_GRID.values())))
    ranked = starts[np.argsort([_objective(start, *data)[0] for start in starts])]
    best = min((_minimise(start, data) for start in ranked[:refined_starts]), key=lambda result: result.fun)
    return _law(best.x)


def bootstrap(parameters, tokens, losses, law: Law, samples: int = 200, seed: int = 0) -> list[Law]:
    """Laws refitted to `samples` resamplings of the runs (with replacement), each started from `law`."""
    parameters, tokens, losses = _check(parameters, tokens, losses)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(samples):
        chosen = rng.integers(0, len(losses), len(losses))
        if len(np.unique(parameters[chosen])) < 2 or len(np.unique(tokens[chosen])) < 2:
            continue  # a resampling without two sizes and two budgets cannot separate N from D
        data = (np.log(parameters[chosen]), np.log(tokens[chosen]), np.log(losses[chosen]))
        refits.append(_law(_minimise(_theta(law), data).x))
    return refits


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def constant_intervals(refits: list[Law], level: float = 0.95) -> dict[str, tuple[float, float]]:
    return {name: interval([getattr(law, name) for law in refits], level) for name in Law.__dataclass_fields__}


@dataclass(frozen=True)
class Run:
    """One point of a ladder: N (without embeddings), D, the final validation loss, and what else is known."""

    name: str
    parameters: float
    tokens: float
    loss: float
    parameters_with_embeddings: float | None = None
    flops_per_token: float | None = None  # the model's own count (attention included), where known
    fewshot: dict[str, float] | None = None  # `eval/fewshot/<task>/k=<k>` at the last evaluation

    @property
    def compute(self) -> float:
        """Training FLOPs: the model's own count where known, else 6 N D."""
        return (self.flops_per_token or 6 * self.parameters) * self.tokens

    @property
    def nominal_compute(self) -> float:
        """6 N D: the compute a sweep sets its budgets in (launch/sweep.py), and the C of the isoFLOP profiles.
        The model's own count adds attention and the output head, a share that varies with size (from 1.8 to 3.2
        times 6 N D across configs/sweeps/micro-isoflop.yaml), and would split one budget into several."""
        return 6 * self.parameters * self.tokens


CSV_COLUMNS = ("parameters", "tokens", "loss")
FEWSHOT_PREFIX = "eval/fewshot/"  # few-shot accuracies are named `eval/fewshot/<task>/k=<k>`, as in training


def read_csv(path: Path) -> list[Run]:
    """Runs from a CSV with the columns parameters, tokens and loss (and optionally name, compute and few-shot
    accuracies in columns named `eval/fewshot/<task>/k=<k>`, a cell left empty where a run lacks one)."""
    import csv

    try:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError as error:
        raise ScalingError(f"{path}: {error.strerror}") from None
    missing = [column for column in CSV_COLUMNS if not rows or column not in rows[0]]
    if missing:
        raise ScalingError(f"{path}: needs a header with the columns {', '.join(CSV_COLUMNS)} (missing: "
                           f"{', '.join(missing)}) and at least one row")
    runs = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {column: float(row[column]) for column in CSV_COLUMNS}
            compute = float(row["compute"]) if row.get("compute") else None
            fewshot = {column: float(cell) for column, cell in row.items()
                       if column and column.startswith(FEWSHOT_PREFIX) and cell}
        except (TypeError, ValueError):
            raise ScalingError(f"{path}:{line}: parameters, tokens and loss must be numbers (and compute and"
                               f" few-shot accuracies where given), got {row}") from None
        if compute is not None and not compute > 0:
            raise ScalingError(f"{path}:{line}: compute must be a positive number of FLOPs, got {row['compute']}")
        flops_per_token = compute / values["tokens"] if compute else None
        runs.append(Run(row.get("name") or f"row {line}", flops_per_token=flops_per_token, fewshot=fewshot or None,
                        **values))
    return runs


def read_run(run_dir: Path) -> Run:
    """A training run's point: N from its config's model, D and the loss from the end of its metrics.jsonl."""
    import torch

    from pretrain.export import run_config
    from pretrain.metrics import read_metrics
    from pretrain.model import GPT

    config = run_config(run_dir)
    records = read_metrics(run_dir)
    validation = [record for record in records if "val/loss" in record]
    if not validation or validation[-1]["step"] != config.train.max_steps:
        raise ScalingError(f"{run_dir}: has not finished (no validation loss at step {config.train.max_steps});"
                           " finish or remove it before fitting")
    with torch.device("meta"):  # counts only: no memory for the weights
        model = GPT(config.model)
    last = validation[-1]
    fewshot = {key: value for record in records if record["step"] == last["step"]
               for key, value in record.items() if key.startswith("eval/fewshot/")}
    tokens = last["step"] * config.train.global_batch_tokens
    return Run(config.name, model.num_parameters(include_embeddings=False), tokens, last["val/loss"],
               model.num_parameters(), model.flops_per_token(), fewshot or None)


def find_runs(paths: list[Path]) -> list[Run]:
    """Runs from run directories, or from directories that hold run directories (a sweep's output)."""
    runs = []
    for path in paths:
        if (path / "config.yaml").is_file():
            runs.append(read_run(path))
        elif path.is_dir():
            runs.extend(read_run(child) for child in sorted(path.iterdir()) if (child / "config.yaml").is_file())
        else:
            raise ScalingError(f"{path}: no such run directory")
    if not runs:
        raise ScalingError(f"no run directories (with a config.yaml) in {', '.join(map(str, paths))}")
    return runs


# Step counts are rounded, so the runs of one compute budget differ by a few percent; a factor of 1.25 keeps
# them together while keeping apart the budgets of a sweep, which are usually a factor of 2 or more apart.
BUDGET_TOLERANCE = 1.25
BUDGET_RULE = (f"runs sorted by C = 6 N D; a budget holds the cheapest run not yet in one and every run within a"
               f" factor {BUDGET_TOLERANCE} of it; its flops are the geometric mean of their 6 N D")
ISOFLOP_MIN_SIZES = 3  # a parabola through fewer sizes always fits exactly: no evidence of a minimum


def compute_budgets(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped into compute budgets, cheapest first, as BUDGET_RULE says."""
    budgets: list[list[Run]] = []
    for run in sorted(runs, key=lambda run: run.nominal_compute):
        if budgets and run.nominal_compute <= budgets[-1][0].nominal_compute * BUDGET_TOLERANCE:
            budgets[-1].append(run)
        else:
            budgets.append([run])
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


def _interval_or_none(values) -> tuple[float, float] | None:
    """The 95% interval of bootstrap values, or None where no resampling gave one."""
    return interval(values) if len(values) else None


def isoflop_profiles(runs: list[Run], samples: int = 200, seed: int = 0, target_flops: float | None = None) -> dict:
    """Hoffmann et al.'s approach 2. For every compute budget (see BUDGET_RULE) with runs of at least 3 sizes, a
    parabola of loss against log10 N, whose minimum is the budget's N_opt; through the budgets' minima the power law
    log10 N_opt = a log10 C + b (least squares), so N_opt is proportional to C^a and D_opt = C / (6 N_opt) to
    C^(1 - a), C being 6 N D throughout (see `Run.nominal_compute`). Intervals come from refits to the runs
    resampled (with replacement) within each budget: a budget's from the resamplings that give it a minimum, the
    power law's from those that give every budget one.

    Nothing here raises: a budget without a minimum among its sizes, or a power law with fewer than 2 budgets to
    go through, is reported with the reason it was skipped."""
    groups = [group for group in compute_budgets(runs) if len({run.parameters for run in group}) >= ISOFLOP_MIN_SIZES]
    result: dict = {"budget_rule": BUDGET_RULE, "budgets": []}
    if not groups:
        result["skipped"] = (f"no compute budget has runs of {ISOFLOP_MIN_SIZES} or more model sizes; isoFLOP profiles"
                             " need a sweep that trains several sizes at each of a few fixed budgets")
        return result
    profiles = []  # (budget, log10 N, losses, x of the minimum) of the budgets with a minimum
    for group in groups:
        log_parameters = np.log10([run.parameters for run in group])
        losses = np.array([run.loss for run in group])
        parabola, vertex, problem = _parabola_minimum(log_parameters, losses)
        budget = {
            "flops": float(np.exp(np.mean(np.log([run.nominal_compute for run in group])))),
            "runs": [run.name for run in group],
            "parameters": [run.parameters for run in group],
            "losses": [run.loss for run in group],
            "parabola": parabola.tolist(),
        }
        if problem:
            budget["skipped"] = problem
        else:
            profiles.append((budget, log_parameters, losses, vertex))
        result["budgets"].append(budget)

    log_flops = np.log10([budget["flops"] for budget, *_ in profiles])
    rng = np.random.default_rng(seed)
    resampled_vertices: list[list[float]] = [[] for _ in profiles]
    resampled_laws = []  # (a, b) of each resampling that gives every budget a minimum
    for _ in range(samples):
        vertices = []
        for _budget, log_parameters, losses, _vertex in profiles:
            chosen = rng.integers(0, len(losses), len(losses))
            enough_sizes = len(np.unique(log_parameters[chosen])) >= ISOFLOP_MIN_SIZES
            vertices.append(_parabola_minimum(log_parameters[chosen], losses[chosen])[1] if enough_sizes else None)
        for kept, vertex in zip(resampled_vertices, vertices):
            if vertex is not None:
                kept.append(vertex)
        if len(profiles) >= 2 and None not in vertices:
            resampled_laws.append(np.polyfit(log_flops, vertices, 1))
    for (budget, _, _, vertex), kept in zip(profiles, resampled_vertices):
        budget.update({
            "optimal_parameters": 10 ** vertex,
            "optimal_parameters_interval_95": _interval_or_none(np.power(10, kept)),
            "optimal_tokens": budget["flops"] / (6 * 10 ** vertex),
            "loss_at_optimum": float(np.polyval(budget["parabola"], vertex)),
            "bootstrap_samples": len(kept),
        })

    if len(profiles) < 2:
        result["skipped"] = (f"{len(profiles)} compute budget(s) with a minimum among the sizes trained; the power law"
                             " N_opt = k C^a needs at least 2")
        return result
    exponent, intercept = np.polyfit(log_flops, [vertex for *_, vertex in profiles], 1)
    result.update({
        "parameters_exponent": float(exponent),
        "parameters_exponent_interval_95": _interval_or_none([a for a, _ in resampled_laws]),
        "tokens_exponent": float(1 - exponent),
        "tokens_exponent_interval_95": _interval_or_none([1 - a for a, _ in resampled_laws]),
        "parameters_coefficient": float(10 ** intercept),
        "bootstrap_samples": len(resampled_laws),
    })
    if target_flops:
        parameters = float(10 ** (exponent * np.log10(target_flops) + intercept))
        resampled = [10 ** (a * np.log10(target_flops) + b) for a, b in resampled_laws]
        result["compute_optimal"] = {  # at `target_flops`, which analyse's report gives beside it
            "parameters": parameters, "tokens": target_flops / (6 * parameters),
            "parameters_interval_95": _interval_or_none(resampled),
            "tokens_interval_95": _interval_or_none([target_flops / (6 * n) for n in resampled]),
        }
    return result


def fewshot_accuracies(fewshot: dict[str, float] | None) -> dict[tuple[str, int], float]:
    """A run's few-shot accuracies by (task, k), from its `eval/fewshot/<task>/k=<k>` values."""
    from evals.report import fewshot_metric

    # Other values under the prefix (a table, say) are not accuracies.
    return {task_and_k: value for key, value in (fewshot or {}).items() if (task_and_k := fewshot_metric(key))}


def choose_fewshot_k(runs: list[Run], k: int | None) -> dict:
    """The k at which the report compares the runs' few-shot accuracy, with the tasks evaluated at it: `k` where
    given (an error when no run has it), else the largest k that every run with few-shot results has."""
    shots_per_run = [found for run in runs if (found := {shot for _, shot in fewshot_accuracies(run.fewshot)})]
    if not shots_per_run:
        if k is not None:
            raise ScalingError(f"few-shot k={k} (--fewshot-k): no run has few-shot results"
                               f" ({FEWSHOT_PREFIX}<task>/k=<k> in its metrics, or such columns in the CSV);"
                               " leave the option out")
        return {"skipped": "no run has few-shot results"}
    evaluated = ", ".join(map(str, sorted(set().union(*shots_per_run))))
    if k is None:
        common = set.intersection(*shots_per_run)
        if not common:
            return {"skipped": f"no k is evaluated in every run with few-shot results (the runs have k = {evaluated});"
                               " choose one with --fewshot-k"}
        k = max(common)
    elif not any(k in shots for shots in shots_per_run):
        raise ScalingError(f"few-shot k={k} (--fewshot-k): no run has few-shot results at k={k}; the runs have"
                           f" k = {evaluated}")
    tasks = sorted({task for run in runs for task, shot in fewshot_accuracies(run.fewshot) if shot == k})
    return {"k": k, "tasks": tasks, "runs": sum(k in shots for shots in shots_per_run)}


def analyse(runs: list[Run], target_flops: float | None, samples: int, holdout: int, seed: int = 0,
            fewshot_k: int | None = None) -> dict:
    """The fitted law with bootstrap intervals, a holdout check, the isoFLOP profiles, the few-shot k to plot
    and, for `target_flops`, the compute-optimal N and D with intervals: everything the JSON report holds."""
    fewshot = choose_fewshot_k(runs, fewshot_k)  # first: a k no run has fails before the fitting
    parameters, tokens, losses = (np.array([getattr(run, key) for run in runs]) for key in CSV_COLUMNS)
    law = fit_law(parameters, tokens, losses)
    refits = bootstrap(parameters, tokens, losses, law, samples=samples, seed=seed)
    result = {
        "law": law.as_dict(),
        "intervals_95": constant_intervals(refits),
        "bootstrap_samples": len(refits),
        "runs": [{**asdict(run), "compute": run.compute, "compute_6nd": run.nominal_compute,
                  "predicted_loss": float(law.loss(run.parameters, run.tokens))} for run in runs],
    }
    if holdout:
        order = np.argsort([run.compute for run in runs])
        kept, held = order[:-holdout], order[-holdout:]
        partial = fit_law(parameters[kept], tokens[kept], losses[kept])
        predicted = partial.loss(parameters[held], tokens[held])
        result["holdout"] = {
            "held_out": [runs[i].name for i in held],
            "law_without_them": partial.as_dict(),
            "relative_errors": [float(e) for e in (predicted - losses[held]) / losses[held]],
        }
    if target_flops:
        optimal = [law.compute_optimal(target_flops)] + [refit.compute_optimal(target_flops) for refit in refits]
        result["compute_optimal"] = {
            "flops": target_flops,
            "parameters": float(optimal[0][0]), "tokens": float(optimal[0][1]),
            "parameters_interval_95": interval([n for n, _ in optimal[1:]]),
            "tokens_interval_95": interval([d for _, d in optimal[1:]]),
            "loss": float(law.loss(*optimal[0])),
            "loss_interval_95": interval([refit.loss(*refit.compute_optimal(target_flops)) for refit in refits]),
        }
    result["isoflop"] = isoflop_profiles(runs, samples, seed, target_flops)
    if "compute_optimal" in result["isoflop"]:  # reported beside the parametric law's split of the same budget
        result["compute_optimal"]["isoflop"] = result["isoflop"].pop("compute_optimal")
    result["fewshot"] = fewshot
    return result


def plot(result: dict, out_dir: Path) -> list[Path]:
    """fit.png (fitted against observed loss), frontier.png (loss against compute, with the fitted compute-optimal
    frontier), isoflop.png where the runs have isoFLOP budgets and fewshot.png where they have few-shot results,
    each written whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evals.report import write_whole

    law = Law(**result["law"])
    runs = result["runs"]
    observed = [run["loss"] for run in runs]
    predicted = [run["predicted_loss"] for run in runs]

    def save(figure):
        return lambda path: (figure.tight_layout(), figure.savefig(path, format="png"), plt.close(figure))

    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    axes.scatter(observed, predicted, c=np.log10([run["compute_6nd"] for run in runs]), cmap="viridis")
    span = [min(observed + predicted), max(observed + predicted)]
    axes.plot(span, span, color="grey", linestyle="--", label="fit = observed")
    held = set(result.get("holdout", {}).get("held_out", []))
    for run in runs:
        if run["name"] in held:
            axes.annotate("held out", (run["loss"], run["predicted_loss"]), fontsize=7)
    axes.set_xlabel("observed loss")
    axes.set_ylabel("fitted loss")
    axes.set_title("fitted against observed (colour: log10 C = 6 N D)")
    axes.legend()
    written = [write_whole(out_dir / "fit.png", save(figure))]

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted({run["parameters"] for run in runs})
    for index, size in enumerate(sizes):
        # C = 6 N D, the compute the law's frontier is drawn in: the model's own count would shift the points.
        points = sorted((run["compute_6nd"], run["loss"]) for run in runs if run["parameters"] == size)
        axes.plot(*zip(*points), marker="o", color=plt.cm.viridis(index / max(1, len(sizes) - 1)),
                  label=f"N = {size:.3g}")
    budgets = np.geomspace(min(run["compute_6nd"] for run in runs) / 2, max(run["compute_6nd"] for run in runs) * 10,
                           50)
    axes.plot(budgets, law.loss(*law.compute_optimal(budgets)), color="black", linestyle="--",
              label="compute-optimal frontier (fit)")
    axes.set_xscale("log")
    axes.set_xlabel("training compute C = 6 N D (FLOPs)")
    axes.set_ylabel("validation loss")
    axes.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    written.append(write_whole(out_dir / "frontier.png", save(figure)))

    if result["isoflop"]["budgets"]:
        figure, (profiles, optima) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
        _draw_isoflop(profiles, optima, result["isoflop"], law, result.get("compute_optimal"))
        written.append(write_whole(out_dir / "isoflop.png", save(figure)))
    if "k" in result["fewshot"]:
        tasks = result["fewshot"]["tasks"]
        columns = min(3, len(tasks))
        rows = -(-len(tasks) // columns)
        figure, panels = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), dpi=120, squeeze=False)
        _draw_fewshot(figure, list(panels.ravel()), runs, result["fewshot"])
        written.append(write_whole(out_dir / "fewshot.png", save(figure)))
    return written


def format_interval(interval_95) -> str:
    """` [low, high]` to 3 significant digits, or nothing where no bootstrap resampling gave an interval."""
    return f" [{interval_95[0]:.3g}, {interval_95[1]:.3g}]" if interval_95 else ""


def _draw_isoflop(profiles, optima, isoflop: dict, law: Law, compute_optimal: dict | None) -> None:
    """Left: each budget's runs, its parabola in log N and the parabola's minimum (a star); right: the minima
    against compute, with their intervals, the isoFLOP power law through them and the parametric law's N_opt."""
    import textwrap

    from matplotlib import colormaps
    from matplotlib.ticker import NullFormatter

    budgets = isoflop["budgets"]
    for index, budget in enumerate(budgets):
        colour = colormaps["viridis"](index / max(1, len(budgets) - 1))
        skipped = "skipped" in budget
        profiles.scatter(budget["parameters"], budget["losses"], color=colour,
                         label=f"C = {budget['flops']:.2g}" + (" (skipped)" if skipped else ""))
        sizes = np.linspace(np.log10(min(budget["parameters"])), np.log10(max(budget["parameters"])), 100)
        profiles.plot(10 ** sizes, np.polyval(budget["parabola"], sizes), color=colour,
                      linestyle=":" if skipped else "-")
        if skipped:
            continue
        optimum = budget["optimal_parameters"]
        profiles.scatter([optimum], [budget["loss_at_optimum"]], marker="*", s=200, color=colour,
                         edgecolors="black", zorder=3)
        optima.scatter([budget["flops"]], [optimum], color=colour)
        # A segment, not an error bar: a percentile interval need not contain the estimate.
        if budget["optimal_parameters_interval_95"]:
            optima.vlines(budget["flops"], *budget["optimal_parameters_interval_95"], color=colour)
    profiles.set_xscale("log")
    profiles.set_xlabel("parameters N")
    profiles.set_ylabel("validation loss")
    profiles.set_title("isoFLOP profiles: loss at a fixed compute budget (star: minimum)")
    profiles.grid(alpha=0.3)
    profiles.legend(fontsize=7)

    target = (compute_optimal or {}).get("isoflop")
    target_flops = compute_optimal["flops"] if target else None
    flops = [budget["flops"] for budget in budgets] + ([target_flops] if target else [])
    span = np.geomspace(min(flops) / 2, max(flops) * 2, 50)
    if "parameters_exponent" in isoflop:
        exponent, exponent_interval = isoflop["parameters_exponent"], isoflop["parameters_exponent_interval_95"]
        optima.plot(span, isoflop["parameters_coefficient"] * span ** exponent, color="black",
                    label=f"isoFLOP fit: N_opt ∝ C^{exponent:.3f}{format_interval(exponent_interval)}")
        if target:
            target_interval = target["parameters_interval_95"]
            optima.scatter([target_flops], [target["parameters"]], marker="*", s=150, color="black",
                           label=f"target: N_opt {target['parameters']:.3g}{format_interval(target_interval)}")
            if target_interval:
                optima.vlines(target_flops, *target_interval, color="black")
        optima.set_title("compute-optimal model size")
    else:
        optima.set_title(textwrap.fill(isoflop["skipped"], 70), fontsize=8)
    parametric = law.beta / (law.alpha + law.beta)
    optima.plot(span, law.compute_optimal(span)[0], color="grey", linestyle="--",
                label=f"parametric fit: N_opt ∝ C^{parametric:.3f}")
    optima.set_xscale("log")
    optima.set_yscale("log")
    # Over less than a decade matplotlib labels the minor ticks too, and they overlap.
    optima.xaxis.set_minor_formatter(NullFormatter())
    optima.set_xlabel("training compute C (FLOPs)")
    optima.set_ylabel("compute-optimal parameters N_opt")
    optima.grid(alpha=0.3, which="both")
    optima.legend(fontsize=7)


def _draw_fewshot(figure, panels: list, runs: list[dict], fewshot: dict) -> None:
    """One panel per task: accuracy at the chosen k against compute, one line per model size, coloured by log N
    (a colour bar rather than a legend: an isoFLOP sweep has a size or more per run)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    k = fewshot["k"]
    sizes = sorted({run["parameters"] for run in runs})
    # Padded by a factor 1.5 either side, so that a single size still spans a range of colours.
    colours = ScalarMappable(LogNorm(sizes[0] / 1.5, sizes[-1] * 1.5), colormaps["viridis"])
    for panel, task in zip(panels, fewshot["tasks"]):
        for size in sizes:
            points = sorted((run["compute_6nd"], accuracies[task, k]) for run in runs if run["parameters"] == size
                            and (task, k) in (accuracies := fewshot_accuracies(run["fewshot"])))
            if points:
                panel.plot(*zip(*points), marker="o", color=colours.to_rgba(size))
        panel.set_xscale("log")
        panel.set_ylim(0, 1)
        panel.set_xlabel("training compute C = 6 N D (FLOPs)")
        panel.set_ylabel(f"accuracy at k = {k}")
        panel.set_title(f"{task}, {k}-shot")
        panel.grid(alpha=0.3)
        figure.colorbar(colours, ax=panel, label="parameters N")
    for panel in panels[len(fewshot["tasks"]):]:
        panel.set_visible(False)


def wandb_summary(result: dict) -> dict[str, float | str]:
    """The report as flat W&B summary keys: `law/<constant>` with `_low` and `_high` (the 95% interval),
    `holdout/...`, `compute_optimal/...` (`compute_optimal/isoflop_...` from the isoFLOP power law),
    `isoflop/...` and `fewshot/k`."""
    summary: dict[str, float | str] = {"runs": len(result["runs"]),
                                       "law/bootstrap_samples": result["bootstrap_samples"]}
    for name, value in result["law"].items():
        low, high = result["intervals_95"][name]
        summary.update({f"law/{name}": value, f"law/{name}_low": low, f"law/{name}_high": high})
    if "holdout" in result:
        errors = result["holdout"]["relative_errors"]
        summary.update({f"holdout/relative_error/{name}": error
                        for name, error in zip(result["holdout"]["held_out"], errors)})
        summary["holdout/max_abs_relative_error"] = max(abs(error) for error in errors)
    if "compute_optimal" in result:
        summary.update(_numbers_and_intervals(result["compute_optimal"], "compute_optimal/"))
        if "isoflop" in result["compute_optimal"]:
            summary.update(_numbers_and_intervals(result["compute_optimal"]["isoflop"], "compute_optimal/isoflop_"))
    isoflop = result["isoflop"]
    summary.update(_numbers_and_intervals(isoflop, "isoflop/"))
    summary["isoflop/usable_budgets"] = sum("optimal_parameters" in budget for budget in isoflop["budgets"])
    if "skipped" in isoflop:
        summary["isoflop/skipped"] = isoflop["skipped"]
    if "k" in result["fewshot"]:
        summary["fewshot/k"] = result["fewshot"]["k"]
    return summary


def _numbers_and_intervals(values: dict, prefix: str) -> dict[str, float]:
    """The numbers of one level of the report, each `<name>_interval_95` as `<name>_low` and `<name>_high`."""
    flat = {}
    for key, value in values.items():
        if key.endswith("_interval_95") and value:
            name = key.removesuffix("_interval_95")
            flat.update({f"{prefix}{name}_low": value[0], f"{prefix}{name}_high": value[1]})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


RUN_TABLE_COLUMNS = ("name", "parameters", "tokens", "compute", "compute_6nd", "loss", "predicted_loss",
                     "parameters_with_embeddings", "flops_per_token")
BUDGET_TABLE_COLUMNS = ("flops", "runs", "optimal_parameters", "optimal_parameters_low", "optimal_parameters_high",
                        "optimal_tokens", "loss_at_optimum", "skipped")


def log_to_wandb(result: dict, plots: list[Path], settings: dict, group: str, project: str, entity: str | None,
                 mode: str, out_dir: Path) -> str:
    """One W&B run in the sweep's group `group`, named `<group>-scaling` with job type `scaling-fit`, written under
    `out_dir`: the command's `settings` as its config, `wandb_summary(result)` as its summary, the plots as images
    under `plots/<name>`, and the runs (with their few-shot accuracy at the report's k) and the isoFLOP budgets as
    the tables `tables/runs` and `tables/isoflop_budgets`. Returns a line that says where the run went."""
    import shlex

    import wandb  # deferred: only a fit logged to W&B needs it

    from pretrain.metrics import wandb_command

    try:
        run = wandb.init(project=project, entity=entity, group=group, job_type="scaling-fit", name=f"{group}-scaling",
                         dir=str(out_dir), mode=mode, config=settings,
                         settings=wandb.Settings(console="off", silent=True))
    except wandb.Error as error:
        raise ScalingError(f"W&B ({mode}): {error}; the fit is written in {out_dir}; log it with --wandb-mode offline"
                           " and upload it later with wandb sync") from None
    logged = {f"plots/{path.stem}": wandb.Image(str(path)) for path in plots if path.suffix == ".png"}
    fewshot_columns = ([f"{FEWSHOT_PREFIX}{task}/k={result['fewshot']['k']}" for task in result["fewshot"]["tasks"]]
                       if "k" in result["fewshot"] else [])
    rows = [[run_row[column] for column in RUN_TABLE_COLUMNS]
            + [(run_row["fewshot"] or {}).get(column) for column in fewshot_columns] for run_row in result["runs"]]
    logged["tables/runs"] = wandb.Table(columns=[*RUN_TABLE_COLUMNS, *fewshot_columns], data=rows)
    if result["isoflop"]["budgets"]:
        budget_rows = []
        for budget in result["isoflop"]["budgets"]:
            low, high = budget.get("optimal_parameters_interval_95") or (None, None)
            budget_rows.append([budget["flops"], len(budget["runs"]), budget.get("optimal_parameters"), low, high,
                                budget.get("optimal_tokens"), budget.get("loss_at_optimum"), budget.get("skipped")])
        logged["tables/isoflop_budgets"] = wandb.Table(columns=list(BUDGET_TABLE_COLUMNS), data=budget_rows)
    run.log(logged)
    run.summary.update(wandb_summary(result))
    run.finish()
    if mode == "offline":
        offline = sorted(str(path) for path in (out_dir / "wandb").glob(f"offline-run-*-{run.id}"))
        return (f"W&B ran offline ({', '.join(offline)}); upload this run with:"
                f" {shlex.join([wandb_command(), 'sync', *offline])} (or `make sync` for every run under a directory)")
    return f"logged the fit to W&B: {run.url}"
