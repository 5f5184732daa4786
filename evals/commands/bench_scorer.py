"""Few-shot evaluation speed: the project's scorer against lm-evaluation-harness, same model, same prompts.

    python -m evals.commands.bench_scorer --tasks hellaswag --items 100 --shots 0,1,2,4,8,16 --examples shared
        --json out.json

One model of the given shape (pretrain.shapes; random weights, since speed does not depend on them)
with a byte-level BPE tokenizer trained on the tasks' own text is scored at every k by `evals.fewshot.evaluate`, and
by lm-evaluation-harness's `hf` model on the same network exported with `evals.commands.hf_export.save_hf`, on the
same device and dtype (bf16 on CUDA, fp32 on a CPU), on the very prompts the project scores (written as local
harness tasks, one per k, each prompt keeping the examples the project's kept). Loading is not timed; each tool's
whole k-sweep is, alternately, --repeats times. Reported: the median seconds of each, the ratio lm-eval / project
(how many times faster the project is), and whether both accuracies (acc and acc_norm, every task and k) are equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from data_pipeline.common.command_line import ArgumentParser, at_least_one, run_command
from data_pipeline.common.devices import device_name, synchronize
from data_pipeline.common.files import write_atomically
from data_pipeline.tokenizer import END_OF_DOCUMENT, train_bpe
from evals.benchmarks import load_evaluation_tasks
from evals.commands.hf_export import save_hf
from evals.commands.lm_eval_tasks import write_lm_eval_tasks
from evals.fewshot import encode_prompt, evaluate
from evals.tasks import PER_ITEM, SHARED, Item, Task
from pretrain.rundir.models import SHAPE_NAMES, SHAPE_SEQ_LENS, untrained_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m evals.commands.bench_scorer", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="hellaswag", help="benchmarks or tasks, comma-separated")
    parser.add_argument("--shape", default="gpt2-124m", choices=SHAPE_NAMES)
    parser.add_argument("--items", type=int, default=100, help="the first N items of each task")
    parser.add_argument("--shots", default="0,1,2,4,8,16")
    parser.add_argument("--examples", choices=(PER_ITEM, SHARED), default=PER_ITEM)
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the tokenizer trained on the tasks' text")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts (project) and requests (lm-eval) per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def tasks_text(tasks: list[Task]) -> list[str]:
    return [item.context + " " + " ".join(item.choices) + " " + item.target for task in tasks for item in task.items]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    at_least_one("items", args.items)
    shots = [int(k) for k in args.shots.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq_len = SHAPE_SEQ_LENS[args.shape]
    tasks = load_evaluation_tasks(args.tasks.split(","), items=args.items)
    tokenizer = train_bpe(tasks_text(tasks), args.vocab_size)
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    model = untrained_model(args.shape, tokenizer.get_vocab_size(), seq_len)

    def kept(task: Task, item: Item, examples: list[Item]) -> list[Item]:
        """The examples the project's prompt keeps once the oldest that do not fit are dropped."""
        dropped = encode_prompt(task, item, examples, tokenizer, seq_len, eod).dropped_examples
        return examples[dropped:]

    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, tasks_dir = Path(scratch) / "hf", Path(scratch) / "tasks"
        save_hf(model, tokenizer, hf_dir)
        write_lm_eval_tasks(tasks, shots, 0, tasks_dir, args.examples, kept)
        harness_model = HFLM(pretrained=str(hf_dir), device=str(device), dtype=str(dtype).removeprefix("torch."),
                             batch_size=args.batch_size, max_length=seq_len)
        task_manager = TaskManager(include_path=str(tasks_dir))
        model = model.to(device=device, dtype=dtype)

        def project() -> dict:
            scores = evaluate(model, tokenizer, tasks, shots, context_length=seq_len, end_of_document_id=eod,
                              batch_size=args.batch_size, examples=args.examples)
            return {f"{score.task}_{score.k}shot": (score.acc, score.acc_norm) for score in scores}

        def harness() -> dict:
            names = [f"{task.name}_{k}shot" for task in tasks for k in shots]
            results = simple_evaluate(model=harness_model, tasks=names, num_fewshot=0, task_manager=task_manager,
                                      verbosity="ERROR")["results"]
            return {name: (results[name]["acc,none"], results[name]["acc_norm,none"]) for name in names}

        seconds: dict[str, list[float]] = {"project": [], "lm_eval": []}
        accuracies = {}
        for _ in range(args.repeats):
            for name, run in (("lm_eval", harness), ("project", project)):
                synchronize(device)
                start = time.perf_counter()
                accuracies[name] = run()
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    same = all(abs(a - b) < 1e-9 for key in accuracies["project"]
               for a, b in zip(accuracies["project"][key], accuracies["lm_eval"][key]))
    figures = {
        "lm_eval_seconds": medians["lm_eval"], "project_seconds": medians["project"],
        "ratio": medians["lm_eval"] / medians["project"], "same_accuracy": same,
        "tasks": args.tasks, "shape": args.shape, "items": args.items, "shots": shots, "examples": args.examples,
        "device": device_name(device), "dtype": str(dtype),
        "torch": torch.__version__, "lm_eval": version("lm_eval"), "transformers": version("transformers"),
        "seconds": seconds, "accuracy": accuracies,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_command(main)
