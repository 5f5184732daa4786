"""What a few-shot evaluation gives: each item's result, and a task's score at one k (accuracy and its standard
error, as lm-evaluation-harness reports them, and the task loss), alone or pooled over a group of tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class ItemResult:
    index: int
    correct: float
    correct_norm: float  # acc_norm; equals `correct` for generation and greedy-match tasks
    dropped_examples: int
    truncated: bool
    log_likelihoods: list[float] = field(default_factory=list)  # per choice; none for generation tasks
    bits_per_byte: float | None = None  # of the gold continuation: the task loss; None for generation tasks


@dataclass
class Score:
    """One task at one k. For generation tasks `acc` is exact match and `acc_norm` repeats it."""

    task: str
    k: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    items: int
    dropped_examples: int  # examples left out of prompts to fit the context, summed over items
    truncated_items: int
    bits_per_byte: float | None = None  # the task loss: mean bits per byte of the gold continuation given the prompt
    seconds: float = 0.0  # the task's whole evaluation, every k together
    results: list[ItemResult] = field(default_factory=list, repr=False)  # per item, for comparisons

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "results"}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error, sample standard deviation / sqrt(n), as lm-evaluation-harness reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def score_of(task: str, k: int, results: list[ItemResult]) -> Score:
    losses = [r.bits_per_byte for r in results if r.bits_per_byte is not None]
    acc, acc_stderr = mean_and_stderr([r.correct for r in results])
    acc_norm, acc_norm_stderr = mean_and_stderr([r.correct_norm for r in results])
    return Score(
        task=task, k=k, acc=acc, acc_stderr=acc_stderr, acc_norm=acc_norm, acc_norm_stderr=acc_norm_stderr,
        items=len(results),
        dropped_examples=sum(r.dropped_examples for r in results), truncated_items=sum(r.truncated for r in results),
        bits_per_byte=sum(losses) / len(losses) if losses else None, results=results,
    )


def group_scores(scores: list[Score], groups: dict[str, list[str]], shots: list[int]) -> list[Score]:
    scored = {score.task for score in scores}
    pooled = []
    for group, members in groups.items():
        if not set(members) <= scored:
            continue
        for k in shots:
            parts = [score for score in scores if score.task in members and score.k == k]
            pooled.append(score_of(group, k, [result for part in parts for result in part.results]))
            pooled[-1].seconds = sum(part.seconds for part in parts)
    return pooled
