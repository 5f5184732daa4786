"""The few-shot section of a run's config, beside the scorer that reads it (`eval.fewshot` in a run config, and
the defaults of `python -m evals fewshot`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from data_pipeline.config import Section


class FewShotConfig(Section):
    """In-context few-shot evaluation (evals/fewshot.py): accuracy against the number of examples k."""

    tasks: list[str] = Field(
        default_factory=lambda: ["word_labels"], min_length=1,
        description="benchmarks (hellaswag, arc_easy, ..., mmlu, lambada: `python -m evals benchmarks`), built-in"
        " tasks (word_labels, word_labels_generate) or .jsonl task files",
    )
    examples: Literal["per_item", "shared"] = Field(
        "per_item", description="per_item: each item draws its own examples; shared: one draw for the whole task,"
        " whose examples are then computed once per k for all items",
    )
    benchmarks_dir: str | None = Field(
        None, description="a folder holding <benchmark>/ folders of your own (a datasets folder, parquet or jsonl"
        " with the original columns); None: the files `make benchmarks` installs",
    )
    shots: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8, 16], min_length=1)
    items: int | None = Field(1000, ge=1, description="items per task (the first N); None: all of a file's")
    interval: int = Field(0, ge=0, description="steps between evaluations during training; 0: none in the loop")
    items_in_loop: int | None = Field(200, ge=1, description="items per task during training; None: as many as items")
    seed: int = Field(0, description="draws each item's examples; the same seed gives the same prompts")
    example_delimiter: str | None = Field(None, description="between examples; None: the task's own")
    target_delimiter: str | None = Field(None, description="between a context and its answer; None: the task's own")
    batch_size: int = Field(32, ge=1, description="prompts per forward pass")
    max_new_tokens: int = Field(16, ge=1, description="greedy tokens at most, for generation tasks")

    @field_validator("shots")
    @classmethod
    def _shots_are_counts(cls, shots: list[int]) -> list[int]:
        if any(k < 0 for k in shots):
            raise ValueError("numbers of examples cannot be negative")
        return sorted(set(shots))
