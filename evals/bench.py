"""Few-shot evaluation speed: the project's scorer against lm-evaluation-harness, same model, same prompts.

    python -m evals.bench [--shape gpt2-124m] [--items 1000] [--shots 0,1,2,4,8,16] [--repeats 3] [--json out.json]

One model of the given shape (pretrain.bench's shapes; random weights, since speed does not depend on them) is
scored on the built-in `word_labels` task at every k, by `evals.fewshot.evaluate` on the project's GPT and by
lm-evaluation-harness's `hf` model on the same network exported with `evals.interop.to_hf`, on the same device
and dtype (bf16 on CUDA, fp32 on a CPU), with the very prompts `python -m evals lm-eval-tasks` writes. Loading
is not timed; each tool's whole k-sweep is, alternately, --repeats times. Reported: the median seconds of each,
the ratio lm-eval / project (how many times faster the project is), and both accuracies (which must agree).
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

from data_pipeline.cli import run_command
from data_pipeline.embedded import icl_episodes
from data_pipeline.files import write_atomically
from data_pipeline.tokenizer import END_OF_DOCUMENT, train_bpe
from evals.fewshot import evaluate
from evals.interop import to_hf, write_lm_eval_tasks
from evals.tasks import WORD_LABELS, load_task
from pretrain.bench import SHAPES
from pretrain.config import ModelConfig
from pretrain.model import GPT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-124m", choices=sorted(SHAPES))
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--shots", default="0,1,2,4,8,16")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts (project) and requests (lm-eval) per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Deferred: the harness and transformers take seconds to import, and only the benchmark needs them.
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    shots = [int(k) for k in args.shots.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    tokenizer = train_bpe(icl_episodes(2000, 0, 64, 8, 4, 24), 2048)
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=max(shape.vocab_size, tokenizer.get_vocab_size()), seq_len=shape.seq_len,
                            n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model)).eval()
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, tasks_dir = Path(scratch) / "hf", Path(scratch) / "tasks"
        to_hf(model, eod).save_pretrained(hf_dir)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_DOCUMENT).save_pretrained(hf_dir)
        write_lm_eval_tasks([WORD_LABELS], shots, args.items, 0, tasks_dir)
        harness_model = HFLM(pretrained=str(hf_dir), device=str(device), dtype=str(dtype).removeprefix("torch."),
                             batch_size=args.batch_size)
        task_manager = TaskManager(include_path=str(tasks_dir))
        model = model.to(device=device, dtype=dtype)
        task = load_task(WORD_LABELS, items=args.items)

        def project():
            return evaluate(model, tokenizer, [task], shots, context_length=shape.seq_len, end_of_document_id=eod,
                            batch_size=args.batch_size)

        def harness():
            return simple_evaluate(model=harness_model, tasks=[f"{WORD_LABELS}_{k}shot" for k in shots],
                                   num_fewshot=0, task_manager=task_manager, verbosity="ERROR")

        seconds = {"project": [], "lm_eval": []}
        for _ in range(args.repeats):
            for name, run in (("lm_eval", harness), ("project", project)):
                synchronize(device)
                start = time.perf_counter()
                result = run()
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
                if name == "project":
                    ours = {score.k: score.acc for score in result}
                else:
                    theirs = {k: result["results"][f"{WORD_LABELS}_{k}shot"]["acc,none"] for k in shots}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    figures = {
        "shape": args.shape, "items": args.items, "shots": shots, "device": torch.cuda.get_device_name()
        if device.type == "cuda" else "cpu", "dtype": str(dtype), "torch": torch.__version__,
        "lm_eval": version("lm_eval"), "transformers": version("transformers"), "seconds": seconds,
        "median_seconds": medians, "speedup": medians["lm_eval"] / medians["project"],
        "acc_project": ours, "acc_lm_eval": theirs,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_command(main)
