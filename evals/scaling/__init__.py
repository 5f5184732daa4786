"""Scaling laws fitted to a ladder of runs: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals.

N is the number of parameters (without embeddings, as the ladder reports it), D the number of training tokens,
and a training run costs about C = 6 N D FLOPs, which gives the compute-optimal split of a budget C.

- `points`: the input, one `RunPoint` per run (from a CSV, or from run directories by `pretrain.rundir`);
- `law`: the parametric fit (Hoffmann et al. 2022, appendix D.2) and its bootstrap intervals;
- `isoflop`: isoFLOP profiles (their approach 2), where a sweep trains several sizes at each of a few budgets;
- `choose_k`: the few-shot k at which the runs' accuracy is compared;
- `report`: everything together as a `ScalingReport` (`analyse`), its JSON and its printed table;
- `plots` and `publish`: the PNGs, and the report in a W&B run.

This package reads typed run points, never a run directory or a live model: it imports nothing from `pretrain`.
"""

from evals.scaling.choose_k import FewshotChoice, choose_fewshot_k
from evals.scaling.isoflop import (
    BudgetOptimum,
    IsoflopBudget,
    IsoflopPowerLaw,
    IsoflopProfiles,
    Split,
    compute_budgets,
    isoflop_profiles,
)
from evals.scaling.law import ConstantIntervals, Law, bootstrap, constant_intervals, fit_law, interval
from evals.scaling.plots import plot
from evals.scaling.points import RunPoint, ScalingError, read_csv
from evals.scaling.publish import log_to_wandb, wandb_summary
from evals.scaling.report import (
    ComputeOptimal,
    FittedRun,
    Holdout,
    ScalingReport,
    analyse,
    format_interval,
    summary_lines,
)

__all__ = [
    "BudgetOptimum", "ComputeOptimal", "ConstantIntervals", "FewshotChoice", "FittedRun", "Holdout",
    "IsoflopBudget", "IsoflopPowerLaw", "IsoflopProfiles", "Law", "RunPoint", "ScalingError", "ScalingReport",
    "Split", "analyse", "bootstrap", "choose_fewshot_k", "compute_budgets", "constant_intervals", "fit_law",
    "format_interval", "interval", "isoflop_profiles", "log_to_wandb", "plot", "read_csv", "summary_lines",
    "wandb_summary",
]
