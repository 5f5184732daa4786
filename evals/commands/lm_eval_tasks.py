"""Few-shot prompts written as lm-evaluation-harness tasks: the very prompts the project scores, so that the
harness scores them too (`python -m evals lm-eval-tasks`, and the benchmarks that compare the two)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from data_pipeline.common.files import write_atomically
from evals.tasks import MULTIPLE_CHOICE, PER_ITEM, Item, Task, TaskError


def write_lm_eval_tasks(
    tasks: list[Task], shots: list[int], seed: int, out: Path, examples: str = PER_ITEM,
    kept: Callable[[Task, Item, list[Item]], list[Item]] = lambda task, item, shots: shots,
) -> list[Path]:
    """For each task and k: `<task>_<k>shot.jsonl` (context = the k-shot prompt, choices, gold) and a YAML
    lm-evaluation-harness reads with `--include_path OUT --tasks <task>_<k>shot --num_fewshot 0`. kept(task,
    item, shots): the examples the prompt keeps (the project's scorer drops the oldest of a prompt too long)."""
    refused = [task.name for task in tasks if task.kind != MULTIPLE_CHOICE or any(
        item.choices_complete_context for item in task.items)]
    if refused:
        raise TaskError(f"{', '.join(refused)}: only multiple-choice tasks whose choices follow one context are"
                        " written for lm-evaluation-harness")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        drawn = [task.shots(index, max(shots), seed, examples) for index in range(len(task.items))]
        for k in shots:
            name = f"{task.name}_{k}shot"
            documents = out / f"{name}.jsonl"
            write_atomically(documents, "".join(
                json.dumps({"context": task.prompt(item, kept(task, item, drawn[index][:k])),
                            "choices": list(item.choices), "gold": item.gold}) + "\n"
                for index, item in enumerate(task.items)))
            spec = out / f"{name}.yaml"
            write_atomically(spec, yaml.safe_dump({
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(documents.resolve())}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}",
                "target_delimiter": task.target_delimiter,
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }, sort_keys=False, allow_unicode=True))
            written += [documents, spec]
    return written
