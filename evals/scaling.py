"""Scaling laws fitted to a ladder of runs: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals.

The fit follows Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models", appendix D.2): the
Huber loss (delta 1e-3) between the log of the predicted and the observed loss, minimised by L-BFGS from a
grid of starting values (here: from the grid points where the objective is lowest), the best minimum kept.
It is parametrised as a = log A, b = log B, e = log E, so the prediction is
logsumexp(a - alpha log N, b - beta log D, e). Bootstrap intervals refit on
runs resampled with replacement, each refit starting from the full fit.

N is the number of parameters (without embeddings, as the ladder reports it), D the number of training tokens,
and a training run costs about C = 6 N D FLOPs, which gives the compute-optimal split of a budget C.
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


CSV_COLUMNS = ("parameters", "tokens", "loss")


def read_csv(path: Path) -> list[Run]:
    """Runs from a CSV with the columns parameters, tokens and loss (and optionally name and compute)."""
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
        except (TypeError, ValueError):
            raise ScalingError(f"{path}:{line}: parameters, tokens and loss must be numbers, got {row}") from None
        flops_per_token = compute / values["tokens"] if compute else None
        runs.append(Run(row.get("name") or f"row {line}", flops_per_token=flops_per_token, **values))
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


def analyse(runs: list[Run], target_flops: float | None, samples: int, holdout: int, seed: int = 0) -> dict:
    """The fitted law with bootstrap intervals, a holdout check and, for `target_flops`, the compute-optimal
    N and D with intervals: everything the JSON report holds."""
    parameters, tokens, losses = (np.array([getattr(run, key) for run in runs]) for key in CSV_COLUMNS)
    law = fit_law(parameters, tokens, losses)
    refits = bootstrap(parameters, tokens, losses, law, samples=samples, seed=seed)
    result = {
        "law": law.as_dict(),
        "intervals_95": constant_intervals(refits),
        "bootstrap_samples": len(refits),
        "runs": [{**asdict(run), "compute": run.compute, "predicted_loss": float(law.loss(run.parameters, run.tokens))}
                 for run in runs],
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
    return result


def plot(result: dict, out_dir: Path) -> list[Path]:
    """fit.png (fitted against observed loss) and frontier.png (loss against compute, with the fitted
    compute-optimal frontier), each written whole."""
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
    axes.scatter(observed, predicted, c=np.log10([run["compute"] for run in runs]), cmap="viridis")
    span = [min(observed + predicted), max(observed + predicted)]
    axes.plot(span, span, color="grey", linestyle="--", label="fit = observed")
    held = set(result.get("holdout", {}).get("held_out", []))
    for run in runs:
        if run["name"] in held:
            axes.annotate("held out", (run["loss"], run["predicted_loss"]), fontsize=7)
    axes.set_xlabel("observed loss")
    axes.set_ylabel("fitted loss")
    axes.set_title("fitted against observed (colour: log10 compute)")
    axes.legend()
    written = [write_whole(out_dir / "fit.png", save(figure))]

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted({run["parameters"] for run in runs})
    for index, size in enumerate(sizes):
        points = sorted((run["compute"], run["loss"]) for run in runs if run["parameters"] == size)
        axes.plot(*zip(*points), marker="o", color=plt.cm.viridis(index / max(1, len(sizes) - 1)),
                  label=f"N = {size:.3g}")
    budgets = np.geomspace(min(run["compute"] for run in runs) / 2, max(run["compute"] for run in runs) * 10, 50)
    axes.plot(budgets, law.loss(*law.compute_optimal(budgets)), color="black", linestyle="--",
              label="compute-optimal frontier (fit)")
    axes.set_xscale("log")
    axes.set_xlabel("training compute (FLOPs)")
    axes.set_ylabel("validation loss")
    axes.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    written.append(write_whole(out_dir / "frontier.png", save(figure)))
    return written
