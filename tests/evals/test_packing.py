"""An item's k-shot prompts packed into one tree (and a task's shared examples computed once) give the
log-likelihoods of scoring every prompt alone, for every block, position kind and prompt that overflows."""

import pytest
import torch

from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals.fewshot import encode_prompt, evaluate
from evals.tasks import PER_ITEM, SHARED, Item, Task
from pretrain.config import ModelConfig
from pretrain.model import GPT
from tests.helpers import WORDS, tiny_tokenizer

SHOTS = [0, 1, 2, 4, 8]


def model_of(vocab_size: int, seq_len: int, **shape) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=4, d_model=32, **shape))
    with torch.no_grad():  # spread the untrained logits so that choices differ clearly
        model.token_embedding.weight.normal_(0, 1.0)
    return model.eval()


def colour_task(items: int) -> Task:
    """Contexts of different lengths (every fourth longer than the context alone), multi-token choices."""
    choices = ("red", "violet", "cyan amber", "huge")
    rows = tuple(Item(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(50 if i % 4 == 3 else 1 + i % 5)),
                      choices, i % 4) for i in range(items))
    return Task("colours", "multiple_choice", rows, None, example_delimiter="\n", target_delimiter=" ")


def partial_task(items: int) -> Task:
    """WinoGrande's shape: each choice completes the context, then the same continuation is scored."""
    rows = tuple(Item(f"{WORDS[i % 14]} the", (" cat", " dog", " bird"), i % 3, target=f"is {WORDS[(2 * i) % 14]}",
                      choices_complete_context=True) for i in range(items))
    return Task("partial", "multiple_choice", rows, None, example_delimiter="\n\n", target_delimiter=" ")


def alone(model, request) -> float:
    """One forward pass of this choice's context and continuation, and nothing else."""
    tokens = request.context + request.continuation
    with torch.no_grad():
        log_probs = model(torch.tensor([tokens[:-1]])).float().log_softmax(-1)[0]
    start = len(request.context) - 1
    return sum(float(log_probs[start + i, token]) for i, token in enumerate(request.continuation))


@pytest.mark.parametrize("shape", [
    {"position": "learned"},
    {"position": "rotary", "qk_norm": True},
    {"block": "llama", "position": "rotary", "n_kv_head": 2},
], ids=["gpt2-learned", "gpt2-rotary-qknorm", "llama-gqa"])
@pytest.mark.parametrize("examples", [PER_ITEM, SHARED])
def test_packed_prompts_score_what_each_prompt_scores_alone(shape, examples):
    tokenizer = tiny_tokenizer()
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    # 40 tokens: the larger k overflow and drop their oldest examples; some contexts alone are truncated.
    context_length = 40
    model = model_of(tokenizer.get_vocab_size(), context_length, **shape)
    tasks = [colour_task(10), partial_task(9)]
    scores = evaluate(model, tokenizer, tasks, SHOTS, context_length=context_length, end_of_document_id=eod,
                      batch_size=3, examples=examples)
    dropped = truncated = 0
    for task in tasks:
        for score in (s for s in scores if s.task == task.name):
            for result in score.results:
                item = task.items[result.index]
                shots = task.shots(result.index, max(SHOTS), 0, examples)[: score.k]
                prompt = encode_prompt(task, item, shots, tokenizer, context_length, eod)
                expected = [alone(model, request) for request in prompt.requests]
                assert result.log_likelihoods == pytest.approx(expected, abs=1e-4)
                dropped += prompt.dropped_examples > 0
                truncated += prompt.truncated
    assert dropped and truncated  # the overflowing cases were exercised


def test_shared_examples_are_the_same_for_every_item_and_never_the_item_itself():
    task = colour_task(10)
    drawn = [task.shots(index, 4, 0, SHARED) for index in range(10)]
    shared = task.shared_shots(4, 0)
    for index, examples in enumerate(drawn):
        if task.items[index] in shared:
            assert all(example is not task.items[index] for example in examples)
        else:
            assert examples == shared
