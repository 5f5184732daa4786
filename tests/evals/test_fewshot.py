"""Few-shot scores are the log-likelihoods a user would compute by hand, on nested prompts that are the same
in every run and on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals.benchmarks import load_evaluation_tasks
from evals.fewshot import encode_prompt, evaluate
from evals.tasks import Item, Task, TaskError, load_task
from tests.helpers import WORDS, tiny_model, tiny_tokenizer


def colour_task(items: int = 12) -> Task:
    choices = ("red", "violet", "cyan amber", "huge")  # multi-token and of different lengths in characters
    rows = tuple(Item(f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}", choices, i % 4) for i in range(items))
    return Task("colours", "multiple_choice", rows, None, example_delimiter="\n", target_delimiter=" ")


def log_likelihood_by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """The obvious way: one forward pass of context + continuation, summing the continuation's log-probs."""
    context_ids = tokenizer.encode(context).ids
    whole = tokenizer.encode(context + continuation).ids
    with torch.no_grad():
        log_probs = model(torch.tensor([whole])).log_softmax(-1)[0]
    return sum(float(log_probs[position - 1, whole[position]]) for position in range(len(context_ids), len(whole)))


@pytest.mark.parametrize("k", [0, 2, 5])
def test_acc_and_acc_norm_equal_hand_computed_log_likelihoods(k):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.get_vocab_size())
    task = colour_task()
    [score] = evaluate(
        model, tokenizer, [task], [k], context_length=64, end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT),
        batch_size=5,
    )
    correct = correct_norm = 0
    for index, item in enumerate(task.items):
        context = task.prompt(item, task.shots(index, k, seed=0))
        likelihoods = [log_likelihood_by_hand(model, tokenizer, context, " " + choice) for choice in item.choices]
        normalised = [ll / len(choice) for ll, choice in zip(likelihoods, item.choices)]
        correct += max(range(4), key=likelihoods.__getitem__) == item.gold
        correct_norm += max(range(4), key=normalised.__getitem__) == item.gold
    assert score.items == len(task.items)
    assert score.acc == pytest.approx(correct / len(task.items))
    assert score.acc_norm == pytest.approx(correct_norm / len(task.items))
    assert score.acc_stderr == pytest.approx((score.acc * (1 - score.acc) / (len(task.items) - 1)) ** 0.5)
    # Not a degenerate case: the length normalisation changes some answers.
    if k == 0:
        assert score.acc != score.acc_norm


def test_k_shot_prompts_are_the_first_k_of_the_k_plus_one_shot_prompts():
    task = load_task("word_labels", items=20)
    for index in range(20):
        sixteen = task.shots(index, 16, seed=3)
        for k in range(16):
            assert task.shots(index, k, seed=3) == sixteen[:k]
        assert task.prompt(task.items[index], sixteen[:1]).endswith(task.prompt(task.items[index], []))
    assert task.shots(0, 8, seed=3) != task.shots(0, 8, seed=4)


def test_prompts_that_do_not_fit_lose_their_oldest_examples_and_say_how_many():
    tokenizer = tiny_tokenizer()
    task = colour_task(items=30)
    shots = task.shots(0, 20, seed=0)
    prompt = encode_prompt(task, task.items[0], shots, tokenizer, 40, tokenizer.token_to_id(END_OF_DOCUMENT))
    kept = shots[prompt.dropped_examples :]
    assert prompt.dropped_examples > 0 and not prompt.truncated
    for request in prompt.requests:
        assert request.context == tokenizer.encode(task.prompt(task.items[0], kept)).ids
        assert len(request.context) + len(request.continuation) - 1 <= 40


def test_a_choice_longer_than_the_context_is_refused_naming_its_item_before_any_scoring():
    tokenizer = tiny_tokenizer()
    task = colour_task(items=3)
    long_choice = " ".join(WORDS * 4)
    items = (task.items[0], Item(task.items[1].context, ("red", long_choice), 0), task.items[2])
    task = Task(task.name, task.kind, items, None, task.example_delimiter, task.target_delimiter)
    with pytest.raises(TaskError, match="colours: item 2 has a choice of"):
        evaluate(tiny_model(tokenizer.get_vocab_size(), seq_len=32), tokenizer, [task], [0], context_length=32,
                 end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT))


RANK_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from tests.helpers import tiny_tokenizer, tiny_model
from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals.fewshot import evaluate
from evals.tasks import load_task
dist.init_process_group("gloo")
tokenizer = tiny_tokenizer()
tasks = [load_task("word_labels", items=25), load_task("word_labels_generate", items=25)]
mine = {t.name: {i: t.prompt(t.items[i], t.shots(i, 8, seed=0)) for i in range(dist.get_rank(), 25, 2)} for t in tasks}
model = tiny_model(tokenizer.get_vocab_size(), seq_len=128)
scores = evaluate(model, tokenizer, tasks, [0, 8], context_length=128,
                  end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), batch_size=4)
shared = evaluate(model, tokenizer, [load_task("word_labels", items=25)], [0, 8], context_length=128,
                  end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), batch_size=4, examples="shared")
out = {"prompts": mine, "scores": [s.as_dict() for s in scores + shared]}
open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w").write(json.dumps(out))
dist.destroy_process_group()
"""


def test_two_ranks_score_their_shares_of_the_same_prompts_and_agree_with_one_process(tmp_path):
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    environment = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
         str(script), str(tmp_path)],
        cwd=root, env=environment, check=True, timeout=300, capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    tokenizer = tiny_tokenizer()
    tasks = [load_task("word_labels", items=25), load_task("word_labels_generate", items=25)]
    model = tiny_model(tokenizer.get_vocab_size(), seq_len=128)
    single = evaluate(model, tokenizer, tasks, [0, 8], context_length=128,
                      end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT))
    # Shared examples: a rank that computes fewer shared prefixes than another still makes as many model calls.
    single += evaluate(model, tokenizer, tasks[:1], [0, 8], context_length=128,
                       end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), examples="shared")
    for rank, result in enumerate(ranks):
        for task in tasks:
            assert result["prompts"][task.name] == {
                str(i): task.prompt(task.items[i], task.shots(i, 8, seed=0)) for i in range(rank, 25, 2)
            }
        timeless = [{key: value for key, value in score.items() if key != "seconds"} for score in result["scores"]]
        expected = [{key: value for key, value in score.as_dict().items() if key != "seconds"} for score in single]
        # To float rounding: the ranks score in batches of 4, and a CPU's matrix kernels sum in an order that
        # depends on the shape (on AVX-512, bits_per_byte came 5e-10 apart); one item scored differently would
        # move an accuracy by 1/25.
        for got, want in zip(timeless, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-6, abs=0)


def test_a_benchmark_scored_on_its_first_items_draws_their_examples_from_the_whole_split():
    [task] = load_evaluation_tasks(["copa"], items=5)
    assert len(task.items) == 5 and task.pool_size(0) == 99
    drawn = [task.shots(index, 40, seed=0) for index in range(5)]
    assert all(len(examples) == 40 and task.items[index] not in examples for index, examples in enumerate(drawn))
    assert any(example not in task.items for examples in drawn for example in examples)
    assert task.shots(2, 8, seed=0) == drawn[2][:8]
