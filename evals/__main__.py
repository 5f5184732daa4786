"""Evaluate trained models and hand them to other tools.

    python -m evals fewshot --checkpoint runs/quickstart --tasks word_labels --shots 0,1,2,4,8,16
    python -m evals export-hf --checkpoint runs/quickstart --out runs/quickstart/hf
    python -m evals lm-eval-tasks --tasks word_labels --shots 8 --out runs/quickstart/lm_eval_tasks
    python -m evals scaling --runs runs/my-sweep --target-flops 1e21 --out runs/my-sweep/scaling
    python -m evals scaling --csv ladder.csv --out scaling      # (parameters, tokens, loss) from anywhere
    python -m evals scaling --runs runs/my-sweep --out runs/my-sweep/scaling --wandb-group my-sweep  # and to W&B

`fewshot` shards the items across ranks when started by torchrun (`torchrun --nproc_per_node 8 -m evals fewshot
...`). Its settings default to the run's own `eval.fewshot` section; flags override them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evals.tasks import TaskError, load_tasks


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shots(text: str) -> list[int]:
    try:
        shots = sorted({int(part) for part in _comma_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of examples separated by commas, e.g. 0,1,8") from None
    if not shots or shots[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of examples >= 0, e.g. 0,1,8")
    return shots


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fewshot = commands.add_parser("fewshot", help="accuracy against the number of in-context examples")
    fewshot.add_argument("--checkpoint", type=Path, required=True, help="a run directory (output_dir/name)")
    fewshot.add_argument("--step", type=int, help="the checkpoint's step; default: the newest complete one")
    fewshot.add_argument("--tasks", type=_comma_list, help="built-in names or .jsonl files, comma-separated")
    fewshot.add_argument("--shots", type=_shots, help="numbers of examples, comma-separated")
    fewshot.add_argument("--items", type=int, help="items per task")
    fewshot.add_argument("--seed", type=int, help="draws the examples of each item")
    fewshot.add_argument("--batch-size", type=int)
    fewshot.add_argument("--out", type=Path, help="default: RUN_DIR/fewshot/step_<N>")
    fewshot.add_argument("--no-wandb", action="store_true", help="do not log to W&B even if the run does")

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
    source = scaling.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, nargs="+", help="run directories, or directories that hold them")
    source.add_argument("--csv", type=Path, help="a CSV with columns parameters, tokens, loss (name, compute,"
                        " eval/fewshot/<task>/k=<k>)")
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
    scaling.add_argument("--wandb-group", help="also log the fit, its plots and the runs to a W&B run named"
                         " <group>-scaling (job type scaling-fit) in this group, the sweep's, kept in OUT/wandb")
    scaling.add_argument("--wandb-project", default="gpt-pretrain", help="default: %(default)s")
    scaling.add_argument("--wandb-entity", help="default: your W&B default entity")
    scaling.add_argument("--wandb-mode", choices=("auto", "online", "offline", "disabled"), default="auto",
                         help="auto: online where a W&B API key is configured, else offline (upload later with"
                         " wandb sync)")
    return parser.parse_args(argv)


def run_scaling(args: argparse.Namespace) -> int:
    import json

    from evals import scaling
    from evals.report import write_whole
    from evals.scaling import format_interval as interval

    runs = scaling.read_csv(args.csv) if args.csv else scaling.find_runs(args.runs)
    if args.holdout and len(runs) - args.holdout < 5:
        raise scaling.ScalingError(
            f"--holdout {args.holdout} leaves {len(runs) - args.holdout} runs; the fit needs at least 5")
    result = scaling.analyse(runs, args.target_flops, args.bootstrap, args.holdout, fewshot_k=args.fewshot_k)
    args.out.mkdir(parents=True, exist_ok=True)
    law, intervals = result["law"], result["intervals_95"]
    print(f"{len(runs)} runs; L(N, D) = E + A / N^alpha + B / D^beta, 95% bootstrap intervals:")
    for name, value in law.items():
        print(f"  {name:6s} {value:12.5g}  [{intervals[name][0]:.5g}, {intervals[name][1]:.5g}]")
    if "holdout" in result:
        errors = ", ".join(f"{error:+.2%}" for error in result["holdout"]["relative_errors"])
        held_out = ", ".join(result["holdout"]["held_out"])
        print(f"holdout: fitted without {held_out}, predicted them with errors {errors}")
    if "compute_optimal" in result:
        best = result["compute_optimal"]
        print(f"compute-optimal at {best['flops']:.3g} FLOPs: N {best['parameters']:.3g}"
              f"{interval(best['parameters_interval_95'])}, D {best['tokens']:.3g}"
              f"{interval(best['tokens_interval_95'])}, loss {best['loss']:.4g}")
        if "isoflop" in best:
            print(f"  from the isoFLOP power law: N {best['isoflop']['parameters']:.3g}"
                  f"{interval(best['isoflop']['parameters_interval_95'])}, D {best['isoflop']['tokens']:.3g}"
                  f"{interval(best['isoflop']['tokens_interval_95'])}")
    isoflop = result["isoflop"]
    for budget in isoflop["budgets"]:
        about = (f"skipped: {budget['skipped']}" if "skipped" in budget else
                 f"N_opt {budget['optimal_parameters']:.3g}{interval(budget['optimal_parameters_interval_95'])},"
                 f" loss {budget['loss_at_optimum']:.4g}")
        print(f"isoFLOP budget {budget['flops']:.3g} FLOPs ({len(budget['runs'])} runs): {about}")
    if "skipped" in isoflop:
        print(f"isoFLOP: skipped: {isoflop['skipped']}")
    else:
        print(f"isoFLOP power law through the budgets' minima: N_opt ∝ C^{isoflop['parameters_exponent']:.3f}"
              f"{interval(isoflop['parameters_exponent_interval_95'])}, D_opt ∝ C^{isoflop['tokens_exponent']:.3f}"
              f"{interval(isoflop['tokens_exponent_interval_95'])}")
    if "k" in result["fewshot"]:
        fewshot = result["fewshot"]
        print(f"few-shot accuracy against compute at k={fewshot['k']}: {', '.join(fewshot['tasks'])}")
    report = json.dumps(result, indent=2) + "\n"
    written = [write_whole(args.out / "scaling.json", lambda path: path.write_text(report))]
    written += scaling.plot(result, args.out)
    for path in written:
        print(f"wrote {path}")
    if args.wandb_group:
        from pretrain.metrics import wandb_mode

        mode = wandb_mode(args.wandb_mode)
        if mode != "disabled":
            settings = {
                "runs": [str(path) for path in args.runs] if args.runs else None,
                "csv": str(args.csv) if args.csv else None,
                "bootstrap": args.bootstrap, "holdout": args.holdout, "target_flops": args.target_flops,
                "fewshot_k": args.fewshot_k, "out": str(args.out),
            }
            print(scaling.log_to_wandb(result, written, settings, args.wandb_group, args.wandb_project,
                                       args.wandb_entity, mode, args.out))
    return 0


def run_fewshot(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import END_OF_DOCUMENT
    from evals import report
    from evals.fewshot import evaluate
    from pretrain.checkpoint import tag_for_step
    from pretrain.distributed import init_distributed, shutdown
    from pretrain.export import load_checkpoint, run_config, run_tokenizer

    config = run_config(args.checkpoint)
    overrides = {
        "tasks": args.tasks, "shots": args.shots, "items": args.items, "seed": args.seed,
        "batch_size": args.batch_size,
    }
    settings = config.eval.fewshot.model_validate(
        {**config.eval.fewshot.model_dump(), **{key: value for key, value in overrides.items() if value is not None}}
    )
    tasks = load_tasks(
        settings.tasks, items=settings.items, example_delimiter=settings.example_delimiter,
        target_delimiter=settings.target_delimiter,
    )
    tokenizer = run_tokenizer(config)
    model, step, _ = load_checkpoint(args.checkpoint, args.step)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    context = init_distributed(config.deepspeed.timeout_minutes) if distributed else None
    try:
        if context is not None:
            model.to(context.device)
        scores = evaluate(
            model, tokenizer, tasks, settings.shots, context_length=config.model.seq_len,
            end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT), seed=settings.seed,
            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
        )
    finally:
        shutdown()
    if context is not None and not context.is_main:
        return 0
    out = args.out or args.checkpoint / "fewshot" / tag_for_step(step)
    about = {
        "run": str(args.checkpoint), "step": step, "seed": settings.seed, "tasks": settings.tasks,
        "title": f"{config.name} at step {step}",
    }
    print(report.table(scores))
    for path in report.write_files(scores, out, about):
        print(f"wrote {path}")
    if not args.no_wandb:
        log_to_wandb(config, step, scores, out)
    return 0


def log_to_wandb(config, step: int, scores, out: Path) -> None:
    from evals import report
    from pretrain.metrics import wandb_mode

    mode = wandb_mode(config.logging.wandb_mode)
    if mode == "disabled":
        return
    import wandb  # deferred: only a run that logs to W&B needs it

    run = wandb.init(
        project=config.logging.wandb_project, name=f"{config.name}-fewshot-step{step}", group=config.name,
        job_type="fewshot-eval", dir=str(out), mode=mode, config={"run": config.name, "step": step},
        settings=wandb.Settings(console="off", quiet=True),
    )
    report.log_to_wandb(scores, run)
    run.finish()


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.errors import DataError
    from evals.scaling import ScalingError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import exit_on_config_error

    args = parse_args(argv)
    with exit_on_config_error():
        try:
            if args.command == "fewshot":
                return run_fewshot(args)
            if args.command == "scaling":
                return run_scaling(args)
            if args.command == "export-hf":
                from evals.interop import export_hf

                print(f"exported {export_hf(args.checkpoint, args.step, args.out)}")
                return 0
            from evals.interop import write_lm_eval_tasks

            for path in write_lm_eval_tasks(args.tasks, args.shots, args.items, args.seed, args.out):
                print(f"wrote {path}")
            return 0
        except (TaskError, CheckpointError, DataError, ScalingError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
