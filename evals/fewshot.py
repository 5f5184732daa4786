"""Few-shot scoring: accuracy against the number of in-context examples, for any model mapping token ids to
logits. Nothing here knows how the model was trained, so the training loop calls it in-loop and the command
line calls it on a checkpoint.

The model is called as `model(tokens, positions=..., attention_mask=..., logits_at=..., prefix=..., keep=...)`,
the calling convention of pretrain's GPT: (batch, time) token ids in, the logits at the `logits_at` indices out.
Each choice of each k-shot prompt is scored as lm-evaluation-harness scores it (the continuation's summed
log-probabilities after the context, tokenised as it tokenises), but an item's prompts for every k are computed
together: their longest examples once, then one packed row of questions and choices; and examples shared by the
whole task once for every item (evals/packing.py).

Items are sharded across ranks (item i on rank i mod world size) when torch.distributed is initialised; every
rank makes the same number of model calls (ZeRO-3 gathers parameters collectively in each), and the per-item
results are gathered so every rank returns the whole table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from evals.packing import Prompt, Request, Row, row_tensors, tree_row
from evals.scores import ItemResult, Score, group_scores, score_of
from evals.tasks import MULTIPLE_CHOICE, PER_ITEM, SHARED, Item, Task, TaskError


def encode_request(tokenizer: Tokenizer, context: str, continuation: str, end_of_document_id: int) -> Request:
    """As lm-evaluation-harness: the context's trailing spaces move to the continuation, whose tokens are those
    of context + continuation after the context's own; an empty context is the end-of-document token."""
    if not context:
        return Request([end_of_document_id], tokenizer.encode(continuation).ids, len(continuation.encode()))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids, whole = (encoding.ids for encoding in tokenizer.encode_batch([context, context + continuation]))
    return Request(context_ids, whole[len(context_ids):], len(continuation.encode()))


def encode_prompt(
    task: Task, item: Item, shots: list[Item], tokenizer: Tokenizer, max_tokens: int, end_of_document_id: int
) -> Prompt:
    """Every choice of the k-shot prompt (k = len(shots)), tokenised. The oldest examples are dropped while a
    choice's context and continuation exceed `max_tokens`; with none left, contexts lose their oldest tokens,
    each as lm-evaluation-harness truncates it."""
    for dropped in range(len(shots) + 1):
        pairs = task.requests(item, shots[dropped:]) if item.choices else [(task.prompt(item, shots[dropped:]), "")]
        requests = [encode_request(tokenizer, context, continuation, end_of_document_id)
                    for context, continuation in pairs]
        # The last continuation token is predicted, never fed in, hence the - 1.
        if all(len(r.context) + max(len(r.continuation) - 1, 0) <= max_tokens for r in requests):
            return Prompt(len(shots), requests, dropped, truncated=False)
    for request in requests:
        request.context = request.context[-(max_tokens + 1 - len(request.continuation)):]
    return Prompt(len(shots), requests, len(shots), truncated=True)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _most_on_any_rank(count: int, device: torch.device) -> int:
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


def item_rows(prompts: list[Prompt], shared_trunk: Callable[[int, int], tuple[int, ...]] | None) -> list[Row]:
    """An item's prompts as rows: one per number of dropped examples (prompts that dropped different examples
    share no prefix). shared_trunk(dropped, k): the tokens of the task's shared examples, for SHARED draws."""
    rows = []
    for dropped in sorted({prompt.dropped_examples for prompt in prompts}):
        group = [prompt for prompt in prompts if prompt.dropped_examples == dropped]
        shared = shared_trunk is not None and not group[0].truncated
        rows.append(tree_row(group, shared_trunk(dropped, max(p.k for p in group)) if shared else None))
    return rows


def batches_of(rows: list[tuple[int, Row]], batch_size: int, context_length: int) -> list[list[tuple[int, Row]]]:
    """Rows longest first (a shared trunk's together, so that it runs once), each batch within the tokens and
    the attention area of `batch_size` rows of the full context, trunks included (so memory stays what
    batch_size promises, whatever the packing)."""
    def group(row: Row) -> tuple[int, ...]:
        return row.trunk if row.shared else ()

    rows = sorted(rows, key=lambda entry: (group(entry[1]), -len(entry[1].tokens)))
    budget = batch_size * context_length
    batches: list[list[tuple[int, Row]]] = []
    for entry in rows:
        row = entry[1]
        if batches and group(batches[-1][0][1]) == group(row):
            count, longest = len(batches[-1]) + 1, len(batches[-1][0][1].tokens)
            trunk = max(len(other.trunk) for _, other in [*batches[-1], entry])
            if count * (longest + trunk) <= budget and count * longest * (trunk + longest) <= budget * context_length:
                batches[-1].append(entry)
                continue
        batches.append([entry])
    return batches


def distinct_trunks(batch: list[tuple[int, Row]]) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(row.trunk for _, row in batch))


@torch.no_grad()
def run_trunks(model, trunks: list[tuple[int, ...]], device: torch.device) -> list:
    """Each trunk's keys and values per layer, (trunks, kv_heads, longest, head_dim): right-padded causal rows,
    whose padding no trunk token sees."""
    longest = max(len(trunk) for trunk in trunks)
    tokens = torch.tensor([list(trunk) + [0] * (longest - len(trunk)) for trunk in trunks], device=device)
    kept: list = []
    model(tokens, logits_at=torch.zeros(len(trunks), 1, dtype=torch.long, device=device), keep=kept)
    return kept


@torch.no_grad()
def score_multiple_choice(
    model, task: Task, prompts: dict[int, list[Prompt]], rows: list[tuple[int, Row]], batch_size: int,
    context_length: int, progress: tqdm,
) -> dict[int, list[ItemResult]]:
    """Every prompt's results, by k; `rows` hold the prompts packed (item index, row)."""
    device = _model_device(model)
    batches = batches_of(rows, batch_size, context_length)
    trunk_sets = [distinct_trunks(batch) for batch in batches]
    # A batch runs its trunks unless the batch before it ran the same ones (a task's shared examples).
    runs = [any(trunks) and (number == 0 or trunks != trunk_sets[number - 1])
            for number, trunks in enumerate(trunk_sets)]
    calls = _most_on_any_rank(len(batches) + sum(runs), device)
    progress.reset(total=calls)
    likelihoods: dict[tuple[int, int, int], tuple[float, bool]] = {}  # (index, k, choice): (ll, greedy)
    kept, made = [], 0
    for batch, trunks, run in zip(batches, trunk_sets, runs):
        if run:
            kept = run_trunks(model, trunks, device)
            made += 1
            progress.update()
        prefix = None
        if any(trunks):
            which = torch.tensor([trunks.index(row.trunk) for _, row in batch], device=device)
            prefix = kept if len(trunks) == 1 else [(k.index_select(0, which), v.index_select(0, which))
                                                     for k, v in kept]
        trunk_length = max(len(trunk) for trunk in trunks)
        tokens, positions, mask = row_tensors([row for _, row in batch], trunk_length, device)
        at = [[i for scored in row.scored for i in scored.at] for _, row in batch]
        width = max(len(indices) for indices in at)
        logits_at = torch.tensor([indices + indices[:1] * (width - len(indices)) for indices in at], device=device)
        targets = torch.tensor([[t for scored in row.scored for t in scored.tokens] + [0] * (width - len(indices))
                                for (_, row), indices in zip(batch, at)], device=device)
        logits = model(tokens, positions=positions, attention_mask=mask, logits_at=logits_at, prefix=prefix).float()
        token_log_probs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0].tolist()
        greedy = (logits.argmax(-1) == targets).tolist()
        made += 1
        progress.update()
        for number, (index, row) in enumerate(batch):
            start = 0
            for scored in row.scored:
                end = start + len(scored.tokens)
                likelihoods[index, scored.k, scored.choice] = (
                    sum(token_log_probs[number][start:end]), all(greedy[number][start:end]))
                start = end
    for _ in range(made, calls):  # an idle rank's share of the collective calls
        model(torch.zeros(1, 1, dtype=torch.long, device=device), logits_at=torch.zeros(1, 1, dtype=torch.long,
                                                                                          device=device))
        progress.update()
    return {index: [_choice_result(task, index, prompt, likelihoods) for prompt in item_prompts]
            for index, item_prompts in prompts.items()}


def _choice_result(task: Task, index: int, prompt: Prompt, likelihoods: dict) -> ItemResult:
    item = task.items[index]
    found = [likelihoods[index, prompt.k, choice] for choice in range(len(prompt.requests))]
    log_likelihoods = [ll for ll, _ in found]
    gold = prompt.requests[item.gold]
    bits_per_byte = -log_likelihoods[item.gold] / math.log(2) / max(gold.continuation_bytes, 1)
    if task.greedy_match:
        correct = correct_norm = float(found[item.gold][1])
    else:
        # acc_norm divides by the choice's length in characters, as lm-evaluation-harness does.
        normalised = [ll / max(len(choice), 1) for ll, choice in zip(log_likelihoods, item.choices)]
        correct, correct_norm = float(_argmax(log_likelihoods) == item.gold), float(_argmax(normalised) == item.gold)
    return ItemResult(index, correct, correct_norm, prompt.dropped_examples, prompt.truncated, log_likelihoods,
                      bits_per_byte)


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
    model, task: Task, prompts: dict[int, list[Prompt]], tokenizer: Tokenizer, new_tokens: int, batch_size: int,
    progress: tqdm,
) -> dict[int, list[ItemResult]]:
    """Greedy decoding for a fixed number of tokens (the same calls on every rank), then exact match."""
    device = _model_device(model)
    entries = [(index, prompt) for index, item_prompts in prompts.items() for prompt in item_prompts]
    batches = [entries[start : start + batch_size] for start in range(0, len(entries), batch_size)]
    count = _most_on_any_rank(len(batches), device)
    progress.reset(total=count * new_tokens)
    results: dict[int, list[ItemResult]] = {index: [] for index in prompts}
    for number in range(count):
        batch = batches[number] if number < len(batches) else []
        sequences = [list(prompt.requests[0].context) for _, prompt in batch] or [[0]]
        starts = [len(sequence) for sequence in sequences]
        for _ in range(new_tokens):
            # Right-padded and causal: a row's own tokens never see the padding after them.
            length = max(len(sequence) for sequence in sequences)
            tokens = torch.tensor([sequence + [0] * (length - len(sequence)) for sequence in sequences],
                                  device=device)
            last = torch.tensor([[len(sequence) - 1] for sequence in sequences], device=device)
            chosen = model(tokens, logits_at=last)[:, 0].argmax(-1).tolist()
            for sequence, token in zip(sequences, chosen):
                sequence.append(token)
            progress.update()
        for (index, prompt), sequence, start in zip(batch, sequences, starts):
            answer = generated_answer(tokenizer.decode(sequence[start:]), task)
            correct = float(answer == task.items[index].target.strip())
            results[index].append(ItemResult(index, correct, correct, prompt.dropped_examples, prompt.truncated))
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
    examples: str = PER_ITEM,
    groups: dict[str, list[str]] | None = None,
    show_progress: bool = True,
) -> list[Score]:
    """Score every task at every k; every rank returns the same list. A choice that cannot fit in the context,
    or a k beyond an item's examples, is a TaskError on every rank alike, before any scoring. examples:
    PER_ITEM draws each item's examples, SHARED one set for the whole task (Task.shots). groups: a score for
    each group whose tasks were all scored (MMLU from its subjects), over their items pooled, as
    lm-evaluation-harness weighs a group's tasks by size."""
    refuse_what_cannot_be_scored(tasks, shots, tokenizer, context_length)
    rank, world = _world()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    scores = []
    try:
        for task in tasks:
            started = time.perf_counter()
            mine = range(rank, len(task.items), world)
            new_tokens = 0
            if task.kind != MULTIPLE_CHOICE:  # enough for the longest target and the start of what follows it
                longest = max(len(tokenizer.encode(task.target_delimiter + item.target).ids) for item in task.items)
                new_tokens = min(max_new_tokens, longest + 1)
            room = context_length - new_tokens + 1 if new_tokens else context_length
            drawn = {index: task.shots(index, max(shots), seed, examples) for index in mine}
            prompts = {index: [encode_prompt(task, task.items[index], drawn[index][:k], tokenizer, room,
                                             end_of_document_id) for k in shots] for index in mine}
            with tqdm(desc=f"few-shot {task.name}", unit="call", delay=5, leave=False,
                      disable=rank != 0 or not show_progress) as progress:
                if task.kind == MULTIPLE_CHOICE:
                    trunks = SharedTrunks(task, tokenizer, max(shots), seed, context_length) if (
                        examples == SHARED) else None
                    rows = [(index, row) for index in mine for row in item_rows(
                        prompts[index], trunks.tokens if trunks and task.shows_shared_shots(index, max(shots), seed)
                        else None)]
                    results = score_multiple_choice(model, task, prompts, rows, batch_size, context_length,
                                                    progress)
                else:
                    results = score_generation(model, task, prompts, tokenizer, new_tokens, batch_size, progress)
            for number, k in enumerate(shots):
                scores.append(score_of(task.name, k, _gather([results[index][number] for index in mine])))
            seconds = time.perf_counter() - started
            for score in scores[-len(shots):]:
                score.seconds = seconds
    finally:
        if was_training:
            model.train()
    return scores + group_scores(scores, groups or {}, shots)


class SharedTrunks:
    """The tokens of a task's shared examples (examples=SHARED), from the `dropped`-th to the k-th, as the trunk
    whose keys and values are computed once for every item that shows them."""

    def __init__(self, task: Task, tokenizer: Tokenizer, max_shots: int, seed: int, context_length: int):
        self.task, self.tokenizer, self.context_length = task, tokenizer, context_length
        self.shots = task.shared_shots(max_shots, seed)
        self.made: dict[tuple[int, int], tuple[int, ...]] = {}

    def tokens(self, dropped: int, k: int) -> tuple[int, ...]:
        if (dropped, k) not in self.made:
            text = self.task.prompt(Item(""), self.shots[dropped:k]) if k > dropped else ""
            # Positions must stay inside the model; the rows only ever see what their own contexts share.
            self.made[dropped, k] = tuple(self.tokenizer.encode(text).ids[: self.context_length - 1]) if text else ()
        return self.made[dropped, k]


def refuse_what_cannot_be_scored(tasks: list[Task], shots: list[int], tokenizer: Tokenizer,
                                 context_length: int) -> None:
    """Every item is checked on every rank (not only a rank's share), so that all raise together rather than
    one rank failing while the others wait for it in a collective."""
    for task in tasks:
        for number, item in enumerate(task.items, start=1):
            pool = task.pool_size(number - 1)
            if max(shots) > pool:
                raise TaskError(
                    f"{task.name}: k={max(shots)} examples asked for, but item {number} has {pool} to draw from;"
                    f" ask for at most {pool}, or give the task more examples"
                )
            for _, continuation in item.requests(task.target_delimiter):
                tokens = len(tokenizer.encode(continuation).ids)
                if tokens >= context_length:  # at least one context token must come before it
                    raise TaskError(
                        f"{task.name}: item {number} has a choice of {tokens} tokens, which leaves no room for its"
                        f" context in the model's {context_length}; shorten the choice or drop the item"
                    )
