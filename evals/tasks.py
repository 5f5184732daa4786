"""Few-shot tasks: what an item is, the jsonl files they are read from, the built-in tasks, and prompts.

A task file is JSON Lines, one item per line, every line of one kind:

    {"context": "Paris is the capital of", "choices": ["France", "Spain"], "gold": 0}   multiple choice
    {"context": "2 + 3 =", "target": "5"}                                             generation

The k examples shown before an item come from, in this order of preference: the item's own `"examples"`
(a list of items of the same kind, for tasks whose answer depends on a per-item rule), a file beside the
task named `<task>.examples.jsonl`, or else the task's other items. A prompt is

    example_1.context + target_delimiter + example_1.answer + example_delimiter + ... + item.context

and the answer (a choice, or the generated text) follows after `target_delimiter`, as in lm-evaluation-harness.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import CONFIG_ERROR_EXIT_CODE, UserError
from data_pipeline.embedded import episode_inventories
from data_pipeline.sources import jsonl_records

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
PER_ITEM, SHARED = "per_item", "shared"  # how examples are drawn: for each item, or once for the whole task


class TaskError(UserError):
    """A task name or file that cannot be used; the message names it and what to do. Exit 2, as for a bad
    option: what was asked for cannot be evaluated."""

    exit_code = CONFIG_ERROR_EXIT_CODE


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice: the candidate answers ...
    gold: int = -1  # ... and the index of the right one
    target: str = ""  # generation: the expected text
    examples: tuple[Item, ...] = ()  # this item's own few-shot examples, if it has any
    # lm-evaluation-harness's "multiple input" (WinoGrande's partial scoring): each choice completes the context
    # and is followed by the same `target`, whose likelihood after each choice decides.
    choices_complete_context: bool = False

    @property
    def kind(self) -> str:
        return MULTIPLE_CHOICE if self.choices else GENERATION

    def requests(self, target_delimiter: str) -> list[tuple[str, str]]:
        """(context, continuation) of each choice, as lm-evaluation-harness scores them: the continuation's
        log-likelihood after the context."""
        if self.choices_complete_context:
            return [(self.context + choice, target_delimiter + self.target) for choice in self.choices]
        return [(self.context, target_delimiter + choice) for choice in self.choices]

    def demonstration(self, target_delimiter: str) -> str:
        """The item as a solved example in another item's prompt: its context and its right answer."""
        if not self.choices:
            return self.context + target_delimiter + self.target
        context, continuation = self.requests(target_delimiter)[self.gold]
        return context + continuation


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: tuple[Item, ...]
    examples: tuple[Item, ...] | None  # the example split; None: draw from the other items
    example_delimiter: str
    target_delimiter: str
    description: str = ""  # before the examples, e.g. MMLU's "The following are multiple choice questions ..."
    # acc is whether greedy decoding gives the one choice, token by token (LAMBADA's last word), rather than
    # whether the gold choice is the most likely one
    greedy_match: bool = False
    # `examples` is the whole split whose first items are scored (a benchmark's --items N): every item still
    # draws from all the split's other items
    examples_hold_items: bool = False

    def example_pool(self, index: int) -> tuple[Item, ...]:
        """Where item `index` draws its examples from (the item itself is never drawn)."""
        item = self.items[index]
        if item.examples:
            return item.examples
        return self.examples if self.examples is not None else self.items

    def _excluded(self, item: Item) -> Item | None:
        """The item, where its own pool holds it: the task's items, or the split they are the first of."""
        return item if not item.examples and (self.examples is None or self.examples_hold_items) else None

    def pool_size(self, index: int) -> int:
        """How many examples item `index` can draw from, without building anything (a task of 10,000 items asks
        10,000 times)."""
        item = self.items[index]
        return len(self.example_pool(index)) - (self._excluded(item) is not None)

    def shots(self, index: int, max_shots: int, seed: int, examples: str = PER_ITEM) -> list[Item]:
        """The few-shot examples of item `index`, as many as the pool has up to `max_shots`. The k-shot prompt
        uses the first k of them, so prompts are nested across k; the draw depends only on (seed, task, index),
        never on the rank or the process, so every run and every rank builds the same prompts.

        examples=SHARED: one draw for the whole task, so every item's k-shot prompt starts with the same k
        examples (OLMES's fixed examples). An item that is itself among them (when the pool holds the task's
        items) keeps its own draw rather than being shown its own answer."""
        item = self.items[index]
        if examples == SHARED and self.shows_shared_shots(index, max_shots, seed):
            return self.shared_shots(max_shots, seed)
        return _drawn(self.example_pool(index), max_shots, f"{seed}/{self.name}/{index}", self._excluded(item))

    def shows_shared_shots(self, index: int, max_shots: int, seed: int) -> bool:
        """Whether item `index` shows the task's one draw with examples=SHARED: not when it has examples of its
        own, nor when it is itself among that draw."""
        item = self.items[index]
        return not item.examples and all(example is not item for example in self.shared_shots(max_shots, seed))

    def shared_shots(self, max_shots: int, seed: int) -> list[Item]:
        """The one draw of examples=SHARED: from the example split, or else from all the task's items."""
        return _drawn(self.examples if self.examples is not None else self.items, max_shots,
                      f"{seed}/{self.name}/shared")

    def prompt(self, item: Item, shots: list[Item]) -> str:
        """The context before the item's answer (for WinoGrande-style items, before each choice)."""
        demonstrations = [shot.demonstration(self.target_delimiter) for shot in shots]
        return self.description + self.example_delimiter.join([*demonstrations, item.context])

    def requests(self, item: Item, shots: list[Item]) -> list[tuple[str, str]]:
        """(context, continuation) of each choice of `item` after `shots`, the strings that are scored."""
        prompt = self.prompt(item, shots)
        return [(prompt + context[len(item.context):], continuation)
                for context, continuation in item.requests(self.target_delimiter)]


def _drawn(pool: Sequence[Item], count: int, stream: str, excluding: Item | None = None) -> list[Item]:
    """`count` of the pool in a random order (all of it if smaller), never `excluding`. Drawn one at a time, so
    a smaller count draws a prefix of a larger one's: prompts nest across k. O(count), whatever the pool's size."""
    rng, chosen = random.Random(stream), {}
    while len(chosen) < min(count, len(pool) - (excluding is not None)):
        index = rng.randrange(len(pool))
        if pool[index] is not excluding:
            chosen.setdefault(index, None)
    return [pool[index] for index in chosen]


# Built-in tasks: the embedded in-context-learning source's episodes with mappings drawn from a stream of their
# own, never from a training seed. Each item's word -> label mapping is fresh, so its examples are the only
# way to know the answer: accuracy at k=0 is chance (1 / label_words) and rises as examples are added.
WORD_LABELS = "word_labels"
WORD_LABELS_GENERATE = "word_labels_generate"
BUILTIN_TASKS = (WORD_LABELS, WORD_LABELS_GENERATE)
BUILTIN_POOL_PAIRS = 32


def word_label_items(
    count: int, vocabulary_words: int = 64, label_words: int = 8, words_per_episode: int = 4, generate: bool = False
) -> tuple[Item, ...]:
    inputs, labels = episode_inventories(vocabulary_words, label_words)
    items = []
    for index in range(count):
        rng = random.Random(f"builtin/{WORD_LABELS}/{index}")
        words = rng.sample(inputs, words_per_episode)
        mapping = {word: rng.choice(labels) for word in words}
        pool = [rng.choice(words) for _ in range(BUILTIN_POOL_PAIRS)]
        query = rng.choice(words)
        if generate:
            examples = tuple(Item(word, target=mapping[word]) for word in pool)
            items.append(Item(query, target=mapping[query], examples=examples))
        else:
            examples = tuple(Item(word, tuple(labels), labels.index(mapping[word])) for word in pool)
            items.append(Item(query, tuple(labels), labels.index(mapping[query]), examples=examples))
    return tuple(items)


def _item(record: object, where: str) -> Item:
    if not isinstance(record, dict) or not isinstance(record.get("context"), str):
        raise TaskError(f"{where}: needs a string field 'context'")
    context = record["context"]
    if "choices" in record:
        choices, gold = record["choices"], record.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: 'choices' must be a list of at least two strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise TaskError(f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1})")
        item = Item(context, tuple(choices), gold)
    elif isinstance(record.get("target"), str):
        item = Item(context, target=record["target"])
    else:
        raise TaskError(f"{where}: needs 'choices' and 'gold' (multiple choice) or 'target' (generation)")
    examples = record.get("examples", [])
    if not isinstance(examples, list):
        raise TaskError(f"{where}: 'examples' must be a list of items")
    own = tuple(_item(example, f"{where}, examples[{i}]") for i, example in enumerate(examples))
    if any(example.kind != item.kind for example in own):
        raise TaskError(f"{where}: its examples must be of the item's kind ({item.kind})")
    return Item(item.context, item.choices, item.gold, item.target, own)


def read_items(path: Path) -> tuple[Item, ...]:
    if not path.is_file():
        raise TaskError(f"{path}: task file not found; give a built-in task ({', '.join(BUILTIN_TASKS)}) or a .jsonl")
    items = []
    for where, record in jsonl_records(path):
        items.append(_item(record, where))
        if items[-1].kind != items[0].kind:
            raise TaskError(f"{where}: is {items[-1].kind} but the file's first item is {items[0].kind}")
    if not items:
        raise TaskError(f"{path}: holds no items")
    return tuple(items)


def load_task(
    spec: str, items: int | None = None, example_delimiter: str | None = None, target_delimiter: str | None = None
) -> Task:
    """A built-in task by name, or a task file by path; `items` keeps the first N items (built-in: makes N).
    Delimiters left as None take the task's own: a space for the built-in tasks (their training episodes are
    space-separated pairs), lm-evaluation-harness's blank line and space for files."""
    if spec in BUILTIN_TASKS:
        built = word_label_items(items or 1000, generate=spec == WORD_LABELS_GENERATE)
        kind, examples = built[0].kind, None
        defaults = (" ", " ")
    else:
        path = Path(spec)
        if path.suffix != ".jsonl":
            raise TaskError(f"{spec}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a .jsonl task file")
        built = read_items(path)[:items]
        kind = built[0].kind
        examples_path = path.with_name(path.stem + ".examples.jsonl")
        examples = read_items(examples_path) if examples_path.exists() else None
        if examples is not None and examples[0].kind != kind:
            raise TaskError(f"{examples_path}: holds {examples[0].kind} items but {path} is {kind}")
        defaults = ("\n\n", " ")
    return Task(
        name=Path(spec).stem,
        kind=kind,
        items=built,
        examples=examples,
        example_delimiter=defaults[0] if example_delimiter is None else example_delimiter,
        target_delimiter=defaults[1] if target_delimiter is None else target_delimiter,
    )
