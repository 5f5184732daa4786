"""The report in a W&B run the caller started (`data_pipeline.common.wandb_runs`): flat summary keys, the plots as
images and the runs and isoFLOP budgets as tables."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from data_pipeline.common import wandb_runs
from evals.scaling.loss_report import ScalingReport
from evals.scaling.points import FEWSHOT_PREFIX
from evals.scaling.task_report import TaskScalingReport


def _numbers_and_intervals(values: dict, prefix: str) -> dict[str, float]:
    """The numbers of one level of the report's JSON, each `<name>_interval_95` as `<name>_low` and `<name>_high`."""
    flat = {}
    for key, value in values.items():
        if key.endswith("_interval_95") and value:
            name = key.removesuffix("_interval_95")
            flat.update({f"{prefix}{name}_low": value[0], f"{prefix}{name}_high": value[1]})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def wandb_summary(report: ScalingReport) -> dict[str, float | str]:
    """The report as flat W&B summary keys: `law/<constant>` with `_low` and `_high` (the 95% interval),
    `holdout/...`, `compute_optimal/...` (`compute_optimal/isoflop_...` from the isoFLOP power law),
    `isoflop/...` and `fewshot/k`."""
    summary: dict[str, float | str] = {"runs": len(report.runs), "law/bootstrap_samples": report.bootstrap_samples}
    for name, value in asdict(report.law).items():
        low, high = getattr(report.intervals_95, name)
        summary.update({f"law/{name}": value, f"law/{name}_low": low, f"law/{name}_high": high})
    if report.holdout:
        errors = report.holdout.relative_errors
        summary.update({f"holdout/relative_error/{name}": error
                        for name, error in zip(report.holdout.held_out, errors)})
        summary["holdout/max_abs_relative_error"] = max(abs(error) for error in errors)
    if report.compute_optimal:
        summary.update(_numbers_and_intervals(report.compute_optimal.to_json(), "compute_optimal/"))
        if report.compute_optimal.isoflop:
            summary.update(_numbers_and_intervals(asdict(report.compute_optimal.isoflop), "compute_optimal/isoflop_"))
    isoflop = report.isoflop
    if isoflop.power_law:
        summary.update(_numbers_and_intervals(isoflop.power_law.to_json(), "isoflop/"))
    summary["isoflop/usable_budgets"] = isoflop.usable_budgets
    if isoflop.skipped:
        summary["isoflop/skipped"] = isoflop.skipped
    if report.fewshot.k is not None:
        summary["fewshot/k"] = report.fewshot.k
    return summary


RUN_TABLE_COLUMNS = ("name", "parameters", "tokens", "compute", "compute_6nd", "loss", "predicted_loss",
                     "parameters_with_embeddings", "flops_per_token")
BUDGET_TABLE_COLUMNS = ("flops", "runs", "optimal_parameters", "optimal_parameters_low", "optimal_parameters_high",
                        "optimal_tokens", "loss_at_optimum", "skipped")


def log_to_wandb(report: ScalingReport, plots: list[Path], run) -> None:
    """Into the W&B run `run`: `wandb_summary(report)` as its summary, the plots as images under `plots/<name>`,
    and the runs (with their few-shot accuracy at the report's k) and the isoFLOP budgets as the tables
    `tables/runs` and `tables/isoflop_budgets`."""
    logged = {f"plots/{path.stem}": wandb_runs.image(path) for path in plots if path.suffix == ".png"}
    fewshot = report.fewshot
    fewshot_columns = [f"{FEWSHOT_PREFIX}{task}/k={fewshot.k}" for task in fewshot.tasks]  # none without a k
    rows = []
    for fitted in report.runs:
        values = fitted.to_json()
        rows.append([values[column] for column in RUN_TABLE_COLUMNS]
                    + [(fitted.point.fewshot or {}).get(column) for column in fewshot_columns])
    logged["tables/runs"] = wandb_runs.table([*RUN_TABLE_COLUMNS, *fewshot_columns], rows)
    if report.isoflop.budgets:
        budget_rows = []
        for budget in report.isoflop.budgets:
            optimum = budget.optimum
            found = [None] * 5
            if optimum:
                low, high = optimum.optimal_parameters_interval_95 or (None, None)
                found = [optimum.optimal_parameters, low, high, optimum.optimal_tokens, optimum.loss_at_optimum]
            budget_rows.append([budget.flops, len(budget.runs), *found, budget.skipped])
        logged["tables/isoflop_budgets"] = wandb_runs.table(list(BUDGET_TABLE_COLUMNS), budget_rows)
    run.log(logged)
    run.summary.update(wandb_summary(report))


PREDICTION_TABLE_COLUMNS = ("target", "parameters", "tokens", "task", "shots", "task_loss", "task_loss_low",
                            "task_loss_high", "accuracy", "accuracy_low", "accuracy_high")


def log_task_scaling_to_wandb(report: TaskScalingReport, plots: list[Path], run) -> None:
    """Into the W&B run `run`: each prediction as summary keys `task_scaling/<target>/<task>/k=<k>/accuracy` (with
    `_low` and `_high`, the 95% interval) and `.../task_loss`, each held-out error as
    `task_scaling/holdout/<run>/<task>/k=<k>/accuracy_error`, the plots under `plots/task_scaling/<name>`, and the
    predictions as the table `tables/task_predictions`."""
    logged = {f"plots/task_scaling/{path.stem}": wandb_runs.image(path) for path in plots if path.suffix == ".png"}
    rows, summary = [], {"task_scaling/bootstrap_samples": report.bootstrap_samples}
    for found in report.predictions:
        accuracy_low, accuracy_high = found.accuracy_interval or (None, None)
        loss_low, loss_high = found.task_loss_interval or (None, None)
        rows.append([found.target, found.parameters, found.tokens, found.task, found.shots, found.task_loss,
                     loss_low, loss_high, found.accuracy, accuracy_low, accuracy_high])
        prefix = f"task_scaling/{found.target}/{found.task}/k={found.shots}"
        summary |= {f"{prefix}/task_loss": found.task_loss, f"{prefix}/accuracy": found.accuracy}
        if found.accuracy_interval:
            summary |= {f"{prefix}/accuracy_low": accuracy_low, f"{prefix}/accuracy_high": accuracy_high}
    if report.holdout:
        for error in report.holdout.errors:
            summary[f"task_scaling/holdout/{error.run}/{error.task}/k={error.shots}/accuracy_error"] = (
                error.predicted_accuracy - error.accuracy)
    logged["tables/task_predictions"] = wandb_runs.table(list(PREDICTION_TABLE_COLUMNS), rows)
    run.log(logged)
    run.summary.update(summary)
