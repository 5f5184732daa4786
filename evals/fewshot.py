"""Few-shot scoring: accuracy against the number of in-context examples, for any model mapping token ids to
logits. Nothing here knows how the model was trained, so the training loop calls it in-loop and the command
line calls it on a checkpoint.

The model is called as `model(tokens, positions=..., attention_mask=..., logits_at=...)`, the calling
convention of pretrain's GPT: (batch, time) token ids in, the logits at the `logits_at` indices out. That lets
the shared prompt of a multiple-choice item be computed once: one row holds the prompt followed by every
choice's tokens, each choice at the positions it would have right after the prompt and attending only to the
prompt and to itself. The log-likelihoods equal those of scoring prompt + choice separately, as
lm-evaluation-harness does, at a fraction of the tokens.

Items are sharded across ranks (item i on rank i mod world size) when torch.distributed is initialised; every
rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each), and the
per-item results are gathered so every rank returns the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from evals.tasks import MULTIPLE_CHOICE, Item, Task, TaskError

PROMPT, PADDING = 0, -1  # segment ids of a packed row; choice i is segment i + 1


@dataclass
class Prompt:
    """The token ids of one item's k-shot prompt, after dropping the oldest examples that did not fit."""

    context: list[int]
    continuations: list[list[int]]  # one per choice (multiple choice), or none (generation)
    dropped_examples: int
    truncated: bool  # even with no examples the context had to lose its oldest tokens


@dataclass
class ItemResult:
    index: int
    correct: float
    correct_norm: float  # acc_norm; equals `correct` for generation tasks
    dropped_examples: int
    truncated: bool


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

    def as_dict(self) -> dict:
        return asdict(self)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error, sample standard deviation / sqrt(n), as lm-evaluation-harness reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def encode_prompt(
    task: Task, item: Item, shots: list[Item], tokenizer: Tokenizer, max_tokens: int, end_of_document_id: int
) -> Prompt:
    """Tokenise the prompt and its continuations the way lm-evaluation-harness does: the continuation's tokens
    are those of context + continuation after the context's own tokens; an empty context is the end-of-document
    token. The oldest examples are dropped while the prompt and its longest continuation exceed `max_tokens`."""
    answers = [task.target_delimiter + choice for choice in item.choices]
    for dropped in range(len(shots) + 1):
        text = task.prompt(item, shots[dropped:])
        context = tokenizer.encode(text).ids if text else [end_of_document_id]
        continuations = []
        for answer in answers:
            whole = tokenizer.encode(text + answer).ids
            continuations.append(whole[len(context) :] if text else tokenizer.encode(answer).ids)
        # The last continuation token is predicted, never fed in, hence the - 1.
        longest = max((len(c) for c in continuations), default=1)
        if len(context) + longest - 1 <= max_tokens:
            return Prompt(context, continuations, dropped, truncated=False)
    keep = max_tokens - longest + 1
    return Prompt(context[-keep:], continuations, len(shots), truncated=True)


def packed_row(prompt: Prompt) -> tuple[list[int], list[int], list[int]]:
    """(tokens, positions, segments) of the prompt followed by every continuation but its last token."""
    tokens, segments = list(prompt.context), [PROMPT] * len(prompt.context)
    positions = list(range(len(tokens)))
    for number, continuation in enumerate(prompt.continuations, start=1):
        fed = continuation[:-1]
        tokens += fed
        positions += range(len(prompt.context), len(prompt.context) + len(fed))
        segments += [number] * len(fed)
    return tokens, positions, segments


def scored_positions(prompt: Prompt) -> tuple[list[int], list[int]]:
    """Where in the packed row each continuation token is predicted, and the token: token 0 of every
    continuation at the prompt's last position, token j > 0 right after the continuation's token j - 1."""
    positions, tokens, start = [], [], len(prompt.context)
    for continuation in prompt.continuations:
        positions += [len(prompt.context) - 1] + list(range(start, start + len(continuation) - 1))
        tokens += continuation
        start += len(continuation) - 1
    return positions, tokens


def choice_log_likelihoods(prompt: Prompt, tokens: list[int], log_probs: torch.Tensor) -> list[float]:
    """Summed log-probabilities of each continuation; `tokens` and log_probs (n, vocab) as scored_positions
    lists them."""
    token_log_probs = log_probs[torch.arange(len(tokens)), tokens].tolist()
    totals, start = [], 0
    for continuation in prompt.continuations:
        totals.append(sum(token_log_probs[start : start + len(continuation)]))
        start += len(continuation)
    return totals


def gather_index(positions: list[list[int]], device: torch.device) -> torch.Tensor:
    """(rows, most positions) time indices, each row padded by repeating its first."""
    width = max(len(row) for row in positions)
    return torch.tensor([row + row[:1] * (width - len(row)) for row in positions], device=device)


def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    """The rows right-padded with `fill` to the longest, as one (rows, longest) tensor."""
    length = max(len(row) for row in rows)
    return torch.tensor([row + [fill] * (length - len(row)) for row in rows], dtype=torch.long)


def batch_tensors(rows: list[tuple[list[int], list[int], list[int]]], device: torch.device):
    """Token ids, positions and the attention mask (batch, time, time) of packed rows."""
    tokens, positions, segments = (padded([row[part] for row in rows], fill) for part, fill in
                                   ((0, 0), (1, 0), (2, PADDING)))
    length = tokens.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    mask = earlier & ((key == PROMPT) | (key == query)) & (key != PADDING)
    mask |= torch.eye(length, dtype=torch.bool) & (query == PADDING)  # padding sees itself: no empty softmax rows
    return tokens.to(device), positions.to(device), mask.to(device)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches_on_every_rank(count: int, device: torch.device) -> int:
    if _world()[1] == 1:
        return count
    most = torch.tensor([count], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def _gather(results: list[ItemResult]) -> list[ItemResult]:
    if _world()[1] == 1:
        return results
    every: list[list[ItemResult]] = [[] for _ in range(_world()[1])]
    dist.all_gather_object(every, results)
    return sorted((result for rank_results in every for result in rank_results), key=lambda r: r.index)


def _model_device(model: Callable) -> torch.device:
    parameters = getattr(model, "parameters", None)
    return next(parameters()).device if parameters else torch.device("cpu")


@torch.no_grad()
def score_multiple_choice(model, prompts: list[tuple[int, Item, Prompt]], batch_size: int) -> list[ItemResult]:
    device = _model_device(model)
    packed = [(entry, packed_row(entry[2]), scored_positions(entry[2])) for entry in prompts]
    # Longest first, so the padding in each batch is small and a batch too big for memory fails at once.
    packed.sort(key=lambda row: -len(row[1][0]))
    batches = [packed[start : start + batch_size] for start in range(0, len(packed), batch_size)]
    results = []
    for number in range(_batches_on_every_rank(len(batches), device)):
        batch = batches[number] if number < len(batches) else []
        rows = [row for _, row, _ in batch] or [([0], [0], [PROMPT])]  # an idle rank's filler
        logits_at = gather_index([scored[0] for _, _, scored in batch] or [[0]], device)
        if all(segment == PROMPT for _, _, segments in rows for segment in segments):
            # Only prompts (every choice a single token): right-padded causal rows need no mask, which lets
            # attention take its fastest kernel.
            logits = model(padded([tokens for tokens, _, _ in rows], 0).to(device), logits_at=logits_at)
        else:
            tokens, positions, mask = batch_tensors(rows, device)
            logits = model(tokens, positions=positions, attention_mask=mask, logits_at=logits_at)
        log_probs = logits.float().log_softmax(-1).cpu()
        for row, ((index, item, prompt), _, (_, scored_tokens)) in enumerate(batch):
            likelihoods = choice_log_likelihoods(prompt, scored_tokens, log_probs[row])
            normalised = [ll / max(len(choice), 1) for ll, choice in zip(likelihoods, item.choices)]
            results.append(
                ItemResult(
                    index,
                    float(_argmax(likelihoods) == item.gold),
                    float(_argmax(normalised) == item.gold),
                    prompt.dropped_examples,
                    prompt.truncated,
                )
            )
    return results


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def generated_answer(text: str, task: Task) -> str:
    """The answer in a greedy continuation: after the target delimiter, up to the next example delimiter."""
    text = text.removeprefix(task.target_delimiter)
    if task.example_delimiter:
        text = text.split(task.example_delimiter)[0]
    return text.strip()


@torch.no_grad()
def score_generation(
    model, task: Task, prompts: list[tuple[int, Item, Prompt]], tokenizer: Tokenizer, new_tokens: int, batch_size: int
) -> list[ItemResult]:
    """Greedy decoding for a fixed number of tokens (the same on every rank), then exact match."""
    device = _model_device(model)
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    results = []
    for number in range(_batches_on_every_rank(len(batches), device)):
        batch = batches[number] if number < len(batches) else []
        sequences = [list(prompt.context) for _, _, prompt in batch] or [[0]]
        starts = [len(sequence) for sequence in sequences]
        for _ in range(new_tokens):
            # Right-padded and causal: a row's own tokens never see the padding after them.
            tokens = padded(sequences, 0).to(device)
            last = gather_index([[len(sequence) - 1] for sequence in sequences], device)
            chosen = model(tokens, logits_at=last)[:, 0].argmax(-1).tolist()
            for sequence, token in zip(sequences, chosen):
                sequence.append(token)
        for (index, item, prompt), sequence, start in zip(batch, sequences, starts):
            correct = float(generated_answer(tokenizer.decode(sequence[start:]), task) == item.target.strip())
            results.append(ItemResult(index, correct, correct, prompt.dropped_examples, prompt.truncated))
    return results


def evaluate(
    model,
    tokenizer: Tokenizer,
    tasks: list[Task],
    shots: list[int],
    *,
    context_length: int,
    end_of_document_id: int,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> list[Score]:
    """Score every task at every k; every rank returns the same list. A choice that cannot fit in the context
    is a TaskError on every rank alike, before any scoring."""
    refuse_choices_longer_than(tasks, tokenizer, context_length)
    rank, world = _world()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    scores = []
    try:
        for task in tasks:
            mine = range(rank, len(task.items), world)
            drawn = {index: task.shots(index, max(shots), seed) for index in mine}
            new_tokens = 0
            if task.kind != MULTIPLE_CHOICE:  # enough for the longest target and the start of what follows it
                longest = max(len(tokenizer.encode(task.target_delimiter + item.target).ids) for item in task.items)
                new_tokens = min(max_new_tokens, longest + 1)
            for k in shots:
                room = context_length if task.kind == MULTIPLE_CHOICE else context_length - new_tokens + 1
                prompts = [
                    (index, task.items[index], encode_prompt(
                        task, task.items[index], drawn[index][:k], tokenizer, room, end_of_document_id
                    ))
                    for index in mine
                ]
                if task.kind == MULTIPLE_CHOICE:
                    results = score_multiple_choice(model, prompts, batch_size)
                else:
                    results = score_generation(model, task, prompts, tokenizer, new_tokens, batch_size)
                scores.append(_score(task.name, k, _gather(results)))
    finally:
        if was_training:
            model.train()
    return scores


def refuse_choices_longer_than(tasks: list[Task], tokenizer: Tokenizer, context_length: int) -> None:
    """Every item is checked on every rank (not only a rank's share), so that all raise together rather than
    one rank failing while the others wait for it in a collective."""
    for task in tasks:
        for number, item in enumerate(task.items, start=1):
            for choice in item.choices:
                tokens = len(tokenizer.encode(task.target_delimiter + choice).ids)
                if tokens >= context_length:  # at least one context token must come before it
                    raise TaskError(
                        f"{task.name}: item {number} has a choice of {tokens} tokens, which leaves no room for its"
                        f" context in the model's {context_length}; shorten the choice or drop the item"
                    )


def _score(task: str, k: int, results: list[ItemResult]) -> Score:
    acc, acc_stderr = mean_and_stderr([r.correct for r in results])
    acc_norm, acc_norm_stderr = mean_and_stderr([r.correct_norm for r in results])
    return Score(
        task,
        k,
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        len(results),
        sum(r.dropped_examples for r in results),
        sum(r.truncated for r in results),
    )
