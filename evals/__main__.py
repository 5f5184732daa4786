"""Evaluate trained models and hand them to other tools.

    python -m evals fewshot --checkpoint runs/quickstart --tasks word_labels --shots 0,1,2,4,8,16
    python -m evals fewshot --checkpoint runs/my-run --tasks hellaswag,arc_easy,mmlu --shots 0,1,5,25 --examples shared
    python -m evals benchmarks                 # the built-in benchmarks, their items and where they are read from
    python -m evals export-hf --checkpoint runs/quickstart --out runs/quickstart/hf
    python -m evals lm-eval-tasks --tasks word_labels --shots 8 --out runs/quickstart/lm_eval_tasks
    python -m evals scaling --runs runs/my-sweep --target-flops 1e21 --out runs/my-sweep/scaling
    python -m evals scaling --csv ladder.csv --out scaling      # (parameters, tokens, loss) from anywhere
    python -m evals scaling --runs runs/my-sweep --out runs/my-sweep/scaling --wandb-group my-sweep  # and to W&B
    python -m evals task-scaling --runs runs/icl-ladder --target-config configs/quickstart.yaml --out task-scaling
    python -m evals task-scaling --csv ladder.csv --target-parameters 7e9 --target-tokens 2e12 --holdout largest \
        --out task-scaling      # from a CSV: run,parameters,tokens,task,shots,task_loss,accuracy

`fewshot` shards the items across ranks when started by torchrun (`torchrun --nproc_per_node 8 -m evals fewshot
...`). Its settings default to the run's own `eval.fewshot` section; flags override them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, at_least_one, run_command
from data_pipeline.common.wandb_runs import finish_run, start_run
from data_pipeline.config import validated
from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals import fewshot_results
from evals.benchmarks import benchmark_groups, benchmark_listing, load_evaluation_tasks
from evals.commands.fit_runs import FitSettings, TaskFitSettings, WandbTarget, fit_runs, fit_task_scaling
from evals.commands.hf_export import export_hf
from evals.commands.lm_eval_tasks import write_lm_eval_tasks
from evals.config import FewShotConfig
from evals.fewshot import evaluate
from evals.scaling.task_points import Target
from evals.scores import Score
from pretrain.rundir.points import target_of_config
from pretrain.rundir.reader import Config, load_checkpoint, ranks_of_this_job, run_config, run_tokenizer


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shots(text: str) -> list[int]:
    try:
        shots = sorted({int(part) for part in _comma_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give numbers of examples separated by commas, e.g. 0,1,8") from None
    if not shots or shots[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of examples >= 0, e.g. 0,1,8")
    return shots


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m evals", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fewshot = commands.add_parser("fewshot", help="accuracy against the number of in-context examples")
    fewshot.add_argument("--checkpoint", type=Path, required=True, help="a run directory (output_dir/name)")
    fewshot.add_argument("--step", type=int, help="the checkpoint's step; default: the newest complete one")
    fewshot.add_argument("--tasks", type=_comma_list,
                         help="benchmarks (see: python -m evals benchmarks), built-in tasks or .jsonl files")
    fewshot.add_argument("--shots", type=_shots, help="numbers of examples, comma-separated")
    fewshot.add_argument("--items", type=int, help="items per task: the first N in the file's order (all if fewer)")
    fewshot.add_argument("--examples", choices=("per_item", "shared"),
                         help="per_item: each item draws its examples; shared: one draw for the whole task")
    fewshot.add_argument("--benchmarks-dir", help="a folder of <benchmark>/ folders of your own; default: the"
                         " installed files (make benchmarks)")
    fewshot.add_argument("--seed", type=int, help="draws the examples of each item")
    fewshot.add_argument("--batch-size", type=int)
    fewshot.add_argument("--out", type=Path, help="default: RUN_DIR/fewshot/step_<N>")
    fewshot.add_argument("--no-wandb", action="store_true", help="do not log to W&B even if the run does")

    listing = commands.add_parser("benchmarks", help="the built-in benchmarks: items, choices, metrics, files")
    listing.add_argument("--benchmarks-dir", help="list a folder of your own instead of the installed files")

    export_hf = commands.add_parser("export-hf", help="a Hugging Face transformers model directory")
    export_hf.add_argument("--checkpoint", type=Path, required=True, help="a run directory (output_dir/name)")
    export_hf.add_argument("--step", type=int, help="the checkpoint's step; default: the newest complete one")
    export_hf.add_argument("--out", type=Path, help="default: RUN_DIR/hf/step_<N>")

    lm_eval = commands.add_parser("lm-eval-tasks", help="few-shot tasks as lm-evaluation-harness local tasks")
    lm_eval.add_argument("--tasks", type=_comma_list, required=True)
    lm_eval.add_argument("--shots", type=_shots, required=True)
    lm_eval.add_argument("--items", type=int, default=1000)
    lm_eval.add_argument("--seed", type=int, default=0)
    lm_eval.add_argument("--out", type=Path, required=True)

    scaling = commands.add_parser(
        "scaling", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a ladder of runs",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta to a ladder of runs, with bootstrap intervals, and, where"
        " the runs train 3 or more sizes at one compute budget (runs within a factor 1.25 in C = 6 N D count as"
        " one), isoFLOP profiles: a parabola of loss against log N per budget, and N_opt = k C^a through their"
        " minima.",
    )
    _runs_or_csv(scaling, "a CSV with columns parameters, tokens, loss (name, compute, eval/fewshot/<task>/k=<k>)")
    scaling.add_argument("--target-flops", type=float, help="also give the compute-optimal N and D for this budget")
    scaling.add_argument("--bootstrap", type=int, default=200, help="resamplings for the intervals")
    scaling.add_argument("--holdout", type=int, default=0,
                         help="refit without the K largest-compute runs and report the error predicting them")
    scaling.add_argument("--fewshot-k", type=int,
                         help="plot few-shot accuracy against compute at this k (fewshot.png); default: the largest k"
                         " that every run with few-shot results has")
    scaling.add_argument("--out", type=Path, required=True,
                         help="where scaling.json, fit.png, frontier.png, isoflop.png (where the runs have isoFLOP"
                         " budgets) and fewshot.png (where they have few-shot results) go")
    _wandb_options(scaling, "scaling")

    tasks = commands.add_parser(
        "task-scaling", help="predict a larger model's accuracy at each k from a ladder of runs",
        description="For each task and k: the task loss (bits per byte of the gold answer) as L(N, D) = E + A/N^alpha"
        " + B/D^beta on the final checkpoint of each run, then the accuracy as a / (1 + exp(-s (L - L0))) + b on"
        " every evaluated checkpoint, chained to predict a target's accuracy, with a 95%% interval from a bootstrap"
        " over runs (Bhagia et al. 2024).",
    )
    _runs_or_csv(tasks, "a long CSV with columns run,parameters,tokens,task,shots,task_loss,accuracy: one row per"
                 " evaluated checkpoint, task and k")
    tasks.add_argument("--target-parameters", type=float, help="the target's N, without embeddings")
    tasks.add_argument("--target-tokens", type=float, help="the tokens the target trains on (with --target-config:"
                       " default, those of its schedule)")
    tasks.add_argument("--target-config", type=Path, help="or a run config (YAML) whose model is the target")
    tasks.add_argument("--bootstrap", type=int, default=200, help="resamplings of the runs for the intervals")
    tasks.add_argument("--holdout", choices=("largest",), help="also fit without the runs of the largest size and"
                       " report the errors predicting them")
    tasks.add_argument("--out", type=Path, required=True, help="where task_scaling.json, task_points.csv,"
                       " task_loss.png (step 1), accuracy.png (step 2) and curve.png (accuracy against k) go")
    _wandb_options(tasks, "task-scaling")
    args = parser.parse_args(argv)
    if args.command == "task-scaling":
        if args.target_config and args.target_parameters:
            parser.error("task-scaling: give the target as --target-config or as --target-parameters, not both")
        if (args.target_parameters is None) != (args.target_tokens is None) and not args.target_config:
            parser.error("task-scaling: a target needs both --target-parameters and --target-tokens")
    return args


def _runs_or_csv(command: argparse.ArgumentParser, csv_help: str) -> None:
    """What a fit reads: run directories (`--runs`) or a CSV (`--csv`), one of the two."""
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, nargs="+", help="run directories, or directories that hold them")
    source.add_argument("--csv", type=Path, help=csv_help)


def _wandb_options(command: argparse.ArgumentParser, name: str) -> None:
    command.add_argument("--wandb-group", help=f"also log the fit and its plots to a W&B run named <group>-{name}"
                         " (job type scaling-fit) in this group, the sweep's, kept in OUT/wandb")
    command.add_argument("--wandb-project", default="gpt-pretrain", help="default: %(default)s")
    command.add_argument("--wandb-entity", help="default: your W&B default entity")
    command.add_argument("--wandb-mode", choices=("auto", "online", "offline", "disabled"), default="auto",
                         help="auto: online where a W&B API key is configured, else offline (upload later with"
                         " wandb sync)")


def _wandb_target(args: argparse.Namespace) -> WandbTarget | None:
    return (WandbTarget(args.wandb_group, args.wandb_project, args.wandb_entity, args.wandb_mode)
            if args.wandb_group else None)


def run_scaling(args: argparse.Namespace) -> int:
    settings = FitSettings(out=args.out, runs=args.runs, csv=args.csv, target_flops=args.target_flops,
                           bootstrap=args.bootstrap, holdout=args.holdout, fewshot_k=args.fewshot_k)
    fit_runs(settings, _wandb_target(args))
    return 0


def run_task_scaling(args: argparse.Namespace) -> int:
    at_least_one("bootstrap", args.bootstrap)
    if args.target_config:
        targets = [target_of_config(args.target_config, args.target_tokens)]
    elif args.target_parameters is not None:
        targets = [Target.of_size(args.target_parameters, args.target_tokens)]
    else:
        targets = []
    settings = TaskFitSettings(out=args.out, runs=args.runs, csv=args.csv, targets=targets,
                               bootstrap=args.bootstrap, holdout_largest=args.holdout == "largest")
    fit_task_scaling(settings, _wandb_target(args))
    return 0


def run_fewshot(args: argparse.Namespace) -> int:
    config = run_config(args.checkpoint)
    overrides = {
        "tasks": args.tasks, "shots": args.shots, "items": args.items, "seed": args.seed,
        "batch_size": args.batch_size, "examples": args.examples, "benchmarks_dir": args.benchmarks_dir,
    }
    settings = validated(FewShotConfig, {
        **config.eval.fewshot.model_dump(), **{key: value for key, value in overrides.items() if value is not None}
    })
    tasks = load_evaluation_tasks(
        settings.tasks, items=settings.items, benchmarks_dir=settings.benchmarks_dir,
        example_delimiter=settings.example_delimiter, target_delimiter=settings.target_delimiter,
    )
    for task in tasks:
        if settings.items and len(task.items) < settings.items:
            print(f"{task.name}: holds {len(task.items)} items, fewer than --items {settings.items}; scoring all of"
                  " them, in the file's order")
    tokenizer = run_tokenizer(config)
    trained = load_checkpoint(args.checkpoint, args.step)
    model, step = trained.model, trained.step
    with ranks_of_this_job(config) as context:
        if context is not None:
            model.to(context.device)
        scores = evaluate(
            model, tokenizer, tasks, settings.shots, context_length=config.model.seq_len,
            end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), seed=settings.seed,
            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, examples=settings.examples,
            groups=benchmark_groups(),
        )
    if context is not None and not context.is_main:
        return 0
    out = args.out or args.checkpoint / "fewshot" / trained.tag
    about = {
        "run": str(args.checkpoint), "step": step, "seed": settings.seed, "tasks": settings.tasks,
        "examples": settings.examples,
        "title": f"{config.name} at step {step}",
    }
    print(fewshot_results.table(scores))
    for path in fewshot_results.write_files(scores, out, about):
        print(f"wrote {path}")
    if not args.no_wandb:
        log_fewshot_to_wandb(config, step, scores, out)
    return 0


def log_fewshot_to_wandb(config: Config, step: int, scores: list[Score], out: Path) -> None:
    """The scores in a W&B run of their own, `<run>-fewshot-step<N>` in the run's group."""
    logging = config.logging
    run = start_run(mode=logging.wandb_mode, directory=out, project=logging.wandb_project,
                    entity=logging.wandb_entity, group=config.name, job_type="fewshot-eval",
                    name=f"{config.name}-fewshot-step{step}", config={"run": config.name, "step": step})
    if run is None:
        return
    fewshot_results.log_to_wandb(scores, run)
    finished = finish_run(run)
    if finished:
        print(finished)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "fewshot":
        return run_fewshot(args)
    if args.command == "scaling":
        return run_scaling(args)
    if args.command == "task-scaling":
        return run_task_scaling(args)
    if args.command == "benchmarks":
        print(benchmark_listing(args.benchmarks_dir and Path(args.benchmarks_dir)))
        return 0
    if args.command == "export-hf":
        print(f"exported {export_hf(args.checkpoint, args.step, args.out)}")
        return 0
    at_least_one("items", args.items)
    for path in write_lm_eval_tasks(load_evaluation_tasks(args.tasks, items=args.items), args.shots, args.seed,
                                    args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_command(main)
