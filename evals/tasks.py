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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.embedded import episode_inventories
from data_pipeline.errors import UserError
from data_pipeline.sources import jsonl_records

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"


class TaskError(UserError):
    """A task name or file that cannot be used; the message names it and what to do."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice: the candidate answers ...
    gold: int = -1  # ... and the index of the right one
    target: str = ""  # generation: the expected text
    examples: tuple[Item, ...] = ()  # this item's own few-shot examples, if it has any

    @property
    def kind(self) -> str:
        return MULTIPLE_CHOICE if self.choices else GENERATION

    @property
    def answer(self) -> str:
        return self.choices[self.gold] if self.choices else self.target


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: tuple[Item, ...]
    examples: tuple[Item, ...] | None  # the example split; None: draw from the other items
    example_delimiter: str
    target_delimiter: str

    def example_pool(self, index: int) -> tuple[Item, ...]:
        item = self.items[index]
        if item.examples:
            return item.examples
        if self.examples is not None:
            return self.examples
        return self.items[:index] + self.items[index + 1 :]

    def shots(self, index: int, max_shots: int, seed: int) -> list[Item]:
        """The few-shot examples of item `index`, as many as the pool has up to `max_shots`. The k-shot prompt
        uses the first k of them, so prompts are nested across k; the draw depends only on (seed, task, index),
        never on the rank or the process, so every run and every rank builds the same prompts."""
        pool = self.example_pool(index)
        order = list(range(len(pool)))
        random.Random(f"{seed}/{self.name}/{index}").shuffle(order)  # one whole order: every k takes a prefix
        return [pool[i] for i in order[:max_shots]]

    def prompt(self, item: Item, shots: list[Item]) -> str:
        demonstrations = [f"{shot.context}{self.target_delimiter}{shot.answer}" for shot in shots]
        return self.example_delimiter.join([*demonstrations, item.context])


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


def load_tasks(specs: Iterable[str], **options) -> list[Task]:
    tasks = [load_task(spec, **options) for spec in specs]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"tasks {', '.join(names)}: two share a name; rename one file")
    return tasks
