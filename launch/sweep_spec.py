"""A scaling sweep's spec (configs/sweeps/*.yaml), a file of its own beside the run configs it expands into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from data_pipeline.common.errors import ConfigError
from data_pipeline.config import Section, read_yaml_mapping, validated
from evals.scaling.task_points import Target
from evals.scaling.task_report import check_targets
from pretrain.config import Config
from pretrain.rundir.points import target_of_config


class SweepSize(Section):
    """One rung of a model-size ladder; `lr` overrides the sweep's learning rate for this size."""

    n_layer: int = Field(ge=1)
    d_model: int = Field(ge=1)
    n_head: int = Field(ge=1)
    lr: float | None = Field(None, gt=0)


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep, as `launch.sweep.expand` names and configures it."""

    name: str
    overrides: list[str]  # on top of the base config
    config: Config  # the base config with the overrides: validated before any run starts
    parameters: int  # without embeddings
    tokens: int
    trunk: str | None = None  # a decay branch: the run whose checkpoint it starts from
    branch_step: int = 0  # ... and the step of that checkpoint


class SweepTarget(Section):
    """A model the finished ladder predicts the few-shot accuracy of (`python -m evals task-scaling`): a run
    config, or its N (without embeddings) and D."""

    config: str | None = Field(None, description="a run config (YAML) whose model is the target")
    parameters: float | None = Field(None, gt=0, description="or N, without embeddings")
    tokens: float | None = Field(None, gt=0, description="the tokens it trains on; with config, default: its own")

    @model_validator(mode="after")
    def _a_config_or_a_size(self) -> SweepTarget:
        if bool(self.config) == (self.parameters is not None):
            raise ValueError("give a target as a config (and optionally tokens) or as parameters and tokens")
        if self.parameters is not None and self.tokens is None:
            raise ValueError("a target given by its parameters needs its tokens too")
        return self


class SweepConfig(Section):
    """A scaling sweep (configs/sweeps/*.yaml): every size trained on every token budget with every seed,
    each run the base config with its size, budget, learning rate and seed set (`python -m launch sweep`)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field(description="the config every run starts from, relative to the working directory")
    overrides: list[str] = Field([], description="KEY=VALUE settings for every run, before the sweep's own")
    sizes: list[SweepSize] = Field(min_length=1)
    tokens_per_parameter: list[Annotated[float, Field(gt=0)]] = Field(
        [], description="token budgets, as multiples of the non-embedding parameter count N"
    )
    compute_budgets: list[Annotated[float, Field(gt=0)]] = Field(
        [], description="or budgets in FLOPs C, for isoFLOP profiles: each size trains on C / (6 N) tokens"
    )
    decay_branches: bool = Field(
        False, description="with train.schedule=wsd: each size and seed trains its largest budget once, and its"
        " smaller budgets branch off that run's stable phase and only decay (saving their stable phases)"
    )
    lr: float | None = Field(None, gt=0, description="for sizes without their own; None: the base config's")
    seeds: list[Annotated[int, Field(ge=0)]] = [0]
    bootstrap: int = Field(200, ge=1, description="resamplings of the runs behind each fit's 95% intervals, once the"
                           " ladder has finished")
    output_dir: str = Field("runs", description="runs go to OUTPUT_DIR/<sweep name>/<run name>")
    targets: list[SweepTarget] = Field(
        [], description="models to predict once the ladder has finished: each task's accuracy at each k, from its"
        " few-shot evaluations (OUTPUT_DIR/<sweep name>/task_scaling)"
    )

    @model_validator(mode="after")
    def _one_kind_of_budget(self) -> SweepConfig:
        if bool(self.tokens_per_parameter) == bool(self.compute_budgets):
            raise ValueError("give the token budgets as tokens_per_parameter or as compute_budgets, one of the two")
        return self


    @property
    def can_hold_out_largest(self) -> bool:
        """Whether the runs of the largest size can be held out of a fit (and predicted by it): the others still
        have 2 sizes and 5 runs. The task-scaling fit does so, to show how far its targets can be trusted."""
        budgets = len(self.tokens_per_parameter or self.compute_budgets)
        return len(self.sizes) >= 3 and (len(self.sizes) - 1) * budgets * len(self.seeds) >= 5


def load_sweep(path: str | Path) -> SweepConfig:
    return validated(SweepConfig, read_yaml_mapping(Path(path), "sweep spec"), where=f"{path}: ")


def sweep_targets(sweep: SweepConfig, runs: list[SweepRun]) -> list[Target]:
    """The spec's targets as N and D, checked against the runs before any starts: a target too far from them, or
    runs that evaluate no few-shot task in the loop, would otherwise fail the fit after all the training."""
    targets = [target_of_config(Path(target.config), target.tokens) if target.config
               else Target.of_size(target.parameters, target.tokens) for target in sweep.targets]
    if targets and not all(run.config.eval.fewshot.interval and run.config.eval.fewshot.tasks for run in runs):
        raise ConfigError(f"{sweep.name}: targets are predicted from few-shot evaluations in the loop, and the runs"
                          " have none; set eval.fewshot.tasks and eval.fewshot.interval in the base config or the"
                          " sweep's overrides")
    check_targets(targets, [run.parameters for run in runs], [run.tokens for run in runs])
    return targets
