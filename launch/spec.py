"""A scaling sweep's spec (configs/sweeps/*.yaml), a file of its own beside the run configs it expands into."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from data_pipeline.config import Section, read_yaml_mapping, validated


class SweepSize(Section):
    """One rung of a model-size ladder; `lr` overrides the sweep's learning rate for this size."""

    n_layer: int = Field(ge=1)
    d_model: int = Field(ge=1)
    n_head: int = Field(ge=1)
    lr: float | None = Field(None, gt=0)


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
    output_dir: str = Field("runs", description="runs go to OUTPUT_DIR/<sweep name>/<run name>")

    @model_validator(mode="after")
    def _one_kind_of_budget(self) -> SweepConfig:
        if bool(self.tokens_per_parameter) == bool(self.compute_budgets):
            raise ValueError("give the token budgets as tokens_per_parameter or as compute_budgets, one of the two")
        return self


def load_sweep(path: str | Path) -> SweepConfig:
    return validated(SweepConfig, read_yaml_mapping(Path(path), "sweep spec"), where=f"{path}: ")
