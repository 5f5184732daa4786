"""Fit a ladder of runs and write what a user opens: the printed table, scaling.json (task_scaling.json for the
task-scaling fit), the plots and, where asked, a W&B run in the sweep's group. `python -m evals scaling` calls
`fit_runs`, `python -m evals task-scaling` calls `fit_task_scaling`, and the end of `python -m launch sweep` calls
`fit_runs` with both, into one W&B run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.common.files import write_atomically
from data_pipeline.common.wandb_runs import finish_run, start_run
from evals.scaling.loss_report import ScalingReport, analyse, summary_lines
from evals.scaling.plots import plot
from evals.scaling.points import ScalingError, read_csv
from evals.scaling.publish import log_task_scaling_to_wandb, log_to_wandb
from evals.scaling.task_plots import plot_tasks
from evals.scaling.task_points import Target, read_task_csv, task_csv_text
from evals.scaling.task_report import TaskScalingReport, analyse_tasks
from evals.scaling.task_report import summary_lines as task_summary_lines
from pretrain.rundir.points import scaling_points, task_scaling_points


@dataclass(frozen=True)
class FitSettings:
    """What to fit (run directories, or a CSV) and how; also the config of the fit's W&B run."""

    out: Path  # where scaling.json and the plots go
    runs: list[Path] | None = None  # run directories, or directories that hold them
    csv: Path | None = None
    target_flops: float | None = None
    bootstrap: int = 200
    holdout: int = 0
    fewshot_k: int | None = None

    def as_wandb_config(self) -> dict:
        return {"runs": [str(path) for path in self.runs] if self.runs else None,
                "csv": str(self.csv) if self.csv else None, "bootstrap": self.bootstrap, "holdout": self.holdout,
                "target_flops": self.target_flops, "fewshot_k": self.fewshot_k, "out": str(self.out)}


@dataclass(frozen=True)
class WandbTarget:
    """The W&B run the fit goes to: `<group>-scaling`, job type scaling-fit, in the sweep's group."""

    group: str
    project: str = "gpt-pretrain"
    entity: str | None = None
    mode: str = "auto"  # auto, online, offline or disabled


@dataclass(frozen=True)
class TaskFitSettings:
    """What a task-scaling fit reads (run directories, or a long CSV), what it predicts and how."""

    out: Path  # where task_scaling.json, task_points.csv and the plots go
    runs: list[Path] | None = None
    csv: Path | None = None
    targets: list[Target] = field(default_factory=list)
    bootstrap: int = 200
    holdout_largest: bool = False

    def as_wandb_config(self) -> dict:
        return {"runs": [str(path) for path in self.runs] if self.runs else None,
                "csv": str(self.csv) if self.csv else None, "bootstrap": self.bootstrap,
                "holdout": "largest" if self.holdout_largest else None, "out": str(self.out),
                "targets": [{"name": t.name, "parameters": t.parameters, "tokens": t.tokens} for t in self.targets]}


def _written(out: Path, lines: list[str], files: dict[str, str], plots: Callable[[Path], list[Path]]) -> list[Path]:
    """Print the report, then write its files (each whole) and its plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for line in lines:
        print(line)
    written = [write_atomically(out / name, text) for name, text in files.items()] + plots(out)
    for path in written:
        print(f"wrote {path}")
    return written


def _fit_loss(settings: FitSettings) -> tuple[ScalingReport, list[Path]]:
    points = read_csv(settings.csv) if settings.csv else scaling_points(settings.runs)
    report = analyse(points, settings.target_flops, settings.bootstrap, settings.holdout,
                     fewshot_k=settings.fewshot_k)
    return report, _written(settings.out, summary_lines(report),
                            {"scaling.json": json.dumps(report.to_json(), indent=2) + "\n"},
                            lambda out: plot(report, out))


def _fit_tasks(settings: TaskFitSettings) -> tuple[TaskScalingReport, list[Path]]:
    points = read_task_csv(settings.csv) if settings.csv else task_scaling_points(settings.runs)
    report = analyse_tasks(points, settings.targets, settings.bootstrap, settings.holdout_largest)
    return report, _written(settings.out, task_summary_lines(report),
                            {"task_scaling.json": json.dumps(report.to_json(), indent=2) + "\n",
                             "task_points.csv": task_csv_text(points)},
                            lambda out: plot_tasks(report, out))


def _to_wandb(wandb: WandbTarget, directory: Path, name: str, config: dict, logs: list[Callable]) -> None:
    """One W&B run `name` in the sweep's group, into which each of `logs` writes."""
    run = start_run(mode=wandb.mode, directory=directory, project=wandb.project, entity=wandb.entity,
                    group=wandb.group, job_type="scaling-fit", name=name, config=config)
    if run is not None:
        for log in logs:
            log(run)
        url = None if run.offline else run.url
        print(finish_run(run) or f"logged the fit to W&B: {url}")


def fit_runs(settings: FitSettings, wandb: WandbTarget | None = None,
             tasks: TaskFitSettings | None = None) -> ScalingReport:
    """Fit the runs, print the report, write scaling.json and the plots under `settings.out` (each whole; nothing
    when the runs cannot be fitted), with `tasks` the task-scaling fit too, and log them to W&B where `wandb`
    says (both in one run, `<group>-scaling`)."""
    report, written = _fit_loss(settings)
    task_report, task_written, task_error = None, [], None
    try:
        if tasks:
            task_report, task_written = _fit_tasks(tasks)
    except ScalingError as error:
        task_error = error  # raised once the loss fit, which stands on its own, is logged
    if wandb is not None:
        config = settings.as_wandb_config() | ({"task_scaling": tasks.as_wandb_config()} if tasks else {})
        logs = [lambda run: log_to_wandb(report, written, run)]
        if task_report is not None:
            logs.append(lambda run: log_task_scaling_to_wandb(task_report, task_written, run))
        _to_wandb(wandb, settings.out, f"{wandb.group}-scaling", config, logs)
    if task_error is not None:
        raise task_error
    return report


def fit_task_scaling(settings: TaskFitSettings, wandb: WandbTarget | None = None) -> TaskScalingReport:
    """The task-scaling fit alone: printed, written under `settings.out`, and logged to W&B where `wandb` says
    (a run `<group>-task-scaling`)."""
    report, written = _fit_tasks(settings)
    if wandb is not None:
        _to_wandb(wandb, settings.out, f"{wandb.group}-task-scaling", settings.as_wandb_config(),
                  [lambda run: log_task_scaling_to_wandb(report, written, run)])
    return report
