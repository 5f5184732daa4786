"""Evaluation inside the loop, in-process: when the validator and the few-shot evaluator run, and what they return."""

import pytest
import torch

from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals.benchmarks import benchmark_groups, load_evaluation_tasks
from evals.config import FewShotConfig
from evals.scores import Score
from pretrain.evaluation import FewShotEvaluator, Validator
from pretrain.loss import next_token_loss
from tests.helpers import tiny_model, tiny_tokenizer


def validator(batches=(), interval: int = 4, last_step: int = 10, mean=lambda value: value) -> Validator:
    return Validator(list(batches), torch.device("cpu"), None, interval, last_step, mean)


def test_the_validator_runs_every_interval_and_at_the_last_step():
    assert [step for step in range(1, 11) if validator(interval=4).due(step)] == [4, 8, 10]
    assert [step for step in range(1, 11) if validator(interval=0).due(step)] == [10]


def test_the_validation_loss_is_the_mean_over_batches_averaged_across_ranks_and_leaves_the_model_training():
    model = tiny_model(vocab_size=64).train()
    draws = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 17), generator=draws) for _ in range(3)]
    with torch.no_grad():
        expected = sum(next_token_loss(model.eval(), batch, None).item() for batch in batches) / 3
    model.train()

    metrics = validator(batches, mean=lambda value: value + 1.0).validate(model)  # a mean that shows it was used
    assert metrics == {"val/loss": pytest.approx(expected + 1.0, rel=1e-6)}
    assert model.training


class Scores:
    """Stands in for evals.fewshot.evaluate: returns fixed accuracies and records what it was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, tasks, shots, **options):
        self.calls.append({"model": model, "shots": shots, **options})
        return [Score(task.name, k, acc=0.25 * (k + 1), acc_stderr=0.0, acc_norm=0.0, acc_norm_stderr=0.0, items=4,
                      dropped_examples=0, truncated_items=0) for task in tasks for k in shots]


def fewshot_evaluator(interval: int, tasks: list, said: list, score) -> FewShotEvaluator:
    settings = FewShotConfig(tasks=["word_labels"], shots=[0, 2], interval=interval, seed=3, batch_size=5)
    return FewShotEvaluator(tasks, "tokenizer", settings, context_length=64, end_of_document_id=0, last_step=10,
                            say=said.append, score=score)


def test_the_fewshot_evaluator_runs_every_interval_and_at_the_last_step_and_never_without_tasks():
    tasks = load_evaluation_tasks(["word_labels"], items=4)
    assert [step for step in range(1, 11) if fewshot_evaluator(3, tasks, [], Scores()).due(step)] == [3, 6, 9, 10]
    assert not any(fewshot_evaluator(3, [], [], Scores()).due(step) for step in range(1, 11))


def test_the_fewshot_evaluator_returns_each_tasks_accuracy_at_each_k_and_prints_its_curve():
    tasks, said, scores = load_evaluation_tasks(["word_labels"], items=4), [], Scores()
    metrics = fewshot_evaluator(3, tasks, said, scores).evaluate("model", step=6)
    assert {name: value for name, value in metrics.items() if "/k=" in name and name.count("/") == 3} == {
        "eval/fewshot/word_labels/k=0": 0.25, "eval/fewshot/word_labels/k=2": 0.75}
    (call,) = scores.calls
    assert call == {"model": "model", "shots": [0, 2], "context_length": 64, "end_of_document_id": 0, "seed": 3,
                    "batch_size": 5, "max_new_tokens": 16, "examples": "per_item", "groups": benchmark_groups()}
    assert len(said) == 1 and "0.25" in said[0] and "0.75" in said[0]


def test_a_benchmark_in_the_loop_logs_accuracy_with_acc_norm_task_loss_and_seconds_beside_it():
    tokenizer = tiny_tokenizer()
    tasks = load_evaluation_tasks(["hellaswag", "word_labels"], items=6)
    settings = FewShotConfig(tasks=["hellaswag", "word_labels"], shots=[0, 1], interval=5, examples="shared")
    said = []
    evaluator = FewShotEvaluator(tasks, tokenizer, settings, context_length=512,
                                 end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), last_step=10,
                                 say=said.append)
    metrics = evaluator.evaluate(tiny_model(tokenizer.get_vocab_size(), seq_len=512).train(), step=5)
    for task in ("hellaswag", "word_labels"):
        for k in (0, 1):
            name = f"eval/fewshot/{task}/k={k}"
            fractions = {i / 6 for i in range(7)}  # of 6 items
            assert metrics[name] in fractions and metrics[f"{name}/acc_norm"] in fractions
            assert 0 < metrics[f"{name}/bits_per_byte"] < 100
        assert metrics[f"eval/fewshot/{task}/seconds"] > 0
    assert [line.split(":")[0] for line in said] == ["step 5 few-shot hellaswag", "step 5 few-shot word_labels"]
