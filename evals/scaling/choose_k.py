"""The number of in-context examples k at which the report compares the runs' few-shot accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.scaling.points import FEWSHOT_PREFIX, RunPoint, ScalingError


@dataclass(frozen=True)
class FewshotChoice:
    """The k chosen and the tasks evaluated at it (and in how many runs), or why there is none (`skipped`)."""

    k: int | None = None
    tasks: list[str] = field(default_factory=list)
    runs: int = 0
    skipped: str | None = None

    def to_json(self) -> dict:
        return {"skipped": self.skipped} if self.k is None else {"k": self.k, "tasks": self.tasks, "runs": self.runs}


def choose_fewshot_k(points: list[RunPoint], k: int | None) -> FewshotChoice:
    """`k` where given (an error when no run has it), else the largest k that every run with few-shot results
    has."""
    shots_per_run = [found for point in points if (found := {shot for _, shot in point.fewshot_accuracies()})]
    if not shots_per_run:
        if k is not None:
            raise ScalingError(f"few-shot k={k} (--fewshot-k): no run has few-shot results"
                               f" ({FEWSHOT_PREFIX}<task>/k=<k> in its metrics, or such columns in the CSV);"
                               " leave the option out")
        return FewshotChoice(skipped="no run has few-shot results")
    evaluated = ", ".join(map(str, sorted(set().union(*shots_per_run))))
    if k is None:
        common = set.intersection(*shots_per_run)
        if not common:
            return FewshotChoice(skipped=f"no k is evaluated in every run with few-shot results (the runs have"
                                         f" k = {evaluated}); choose one with --fewshot-k")
        k = max(common)
    elif not any(k in shots for shots in shots_per_run):
        raise ScalingError(f"few-shot k={k} (--fewshot-k): no run has few-shot results at k={k}; the runs have"
                           f" k = {evaluated}")
    tasks = sorted({task for point in points for task, shot in point.fewshot_accuracies() if shot == k})
    return FewshotChoice(k, tasks, sum(k in shots for shots in shots_per_run))
