"""Evaluation inside the training loop: the validation loss (every `eval.interval` steps) and few-shot accuracy
against the number of in-context examples (every `eval.fewshot.interval` steps), both also at the last step.
Each returns the metrics it measured; the loop logs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from evals.benchmarks import benchmark_groups
from evals.config import FewShotConfig
from evals.fewshot import evaluate as evaluate_fewshot
from evals.fewshot_results import metrics_for_logging
from evals.scores import Score
from evals.tasks import Task
from pretrain.loss import next_token_loss


def due(step: int, interval: int, last_step: int) -> bool:
    """Whether step `step` (1-based) evaluates: every `interval` steps (0: never) and at the last step."""
    return bool(interval and step % interval == 0) or step == last_step


@dataclass
class Validator:
    """The mean next-token loss over a fixed set of validation micro-batches, averaged over the ranks by
    `mean_across_ranks` (pretrain.distributed's on a real run)."""

    batches: list[torch.Tensor]  # this rank's share
    device: torch.device
    end_of_document_id: int | None  # None: no document masking
    interval: int
    last_step: int
    mean_across_ranks: Callable[[float], float]

    def due(self, step: int) -> bool:
        return due(step, self.interval, self.last_step)

    @torch.no_grad()
    def validate(self, model) -> dict[str, float]:
        model.eval()
        total = 0.0
        for batch in self.batches:
            total += next_token_loss(model, batch.to(self.device), self.end_of_document_id).item()
        model.train()
        return {"val/loss": self.mean_across_ranks(total / len(self.batches))}


@dataclass
class FewShotEvaluator:
    """Few-shot accuracy of the model being trained. Every rank scores its share of the items and gets the whole
    table back; each task's curve is printed through `say`. No tasks: never due."""

    tasks: list[Task]
    tokenizer: object  # a tokenizers.Tokenizer; None when there are no tasks
    settings: FewShotConfig
    context_length: int
    end_of_document_id: int
    last_step: int
    say: Callable[[str], None]
    score: Callable[..., list[Score]] = evaluate_fewshot

    def due(self, step: int) -> bool:
        return bool(self.tasks) and due(step, self.settings.interval, self.last_step)

    def evaluate(self, model, step: int) -> dict[str, float]:
        settings = self.settings
        scores = self.score(
            model, self.tokenizer, self.tasks, settings.shots, context_length=self.context_length,
            end_of_document_id=self.end_of_document_id, seed=settings.seed, batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens, examples=settings.examples, groups=benchmark_groups(),
        )
        for task in dict.fromkeys(score.task for score in scores):
            curve = ", ".join(f"k={score.k} {score.acc:.2f}" for score in scores if score.task == task)
            self.say(f"step {step} few-shot {task}: {curve}")
        return metrics_for_logging(scores)
