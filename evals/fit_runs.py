"""Fit a ladder of runs and write what a user opens: the printed table, scaling.json, the plots and, where asked,
a W&B run in the sweep's group. `python -m evals scaling` and the end of `python -m launch sweep` both call
`fit_runs`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.files import write_atomically
from evals.scaling.plots import plot
from evals.scaling.points import read_csv
from evals.scaling.publish import log_to_wandb
from evals.scaling.report import ScalingReport, analyse, summary_lines
from pretrain.rundir import scaling_points
from pretrain.wandb_runs import finish_run, start_run


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


def fit_runs(settings: FitSettings, wandb: WandbTarget | None = None) -> ScalingReport:
    """Fit the runs, print the report, write scaling.json and the plots under `settings.out` (each whole; nothing
    when the runs cannot be fitted), and log them to W&B where `wandb` says."""
    points = read_csv(settings.csv) if settings.csv else scaling_points(settings.runs)
    report = analyse(points, settings.target_flops, settings.bootstrap, settings.holdout,
                     fewshot_k=settings.fewshot_k)
    settings.out.mkdir(parents=True, exist_ok=True)
    for line in summary_lines(report):
        print(line)
    written = [write_atomically(settings.out / "scaling.json", json.dumps(report.to_json(), indent=2) + "\n")]
    written += plot(report, settings.out)
    for path in written:
        print(f"wrote {path}")
    if wandb is not None:
        run = start_run(mode=wandb.mode, directory=settings.out, project=wandb.project, entity=wandb.entity,
                        group=wandb.group, job_type="scaling-fit", name=f"{wandb.group}-scaling",
                        config=settings.as_wandb_config())
        if run is not None:
            log_to_wandb(report, written, run)
            url = None if run.offline else run.url
            print(finish_run(run) or f"logged the fit to W&B: {url}")
    return report
