"""A scaling sweep: one spec expanded into runs with stable names, run one after another through the launch
backends, skipping those that finished and resuming those that did not, then fitted.

    python -m launch sweep --spec configs/sweeps/micro.yaml [--backend ...] [--ranks R] [--dry-run]

Each run is the spec's base config with the spec's overrides, then its size (n_layer, d_model, n_head), its
learning rate, its seed, and a token budget given as tokens per non-embedding parameter (rounded up to whole
steps). Runs go to OUTPUT_DIR/<sweep>/<run> and share one W&B group named after the sweep, with the size and
budget as tags.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import newest_complete, read_marker
from pretrain.config import Config, ConfigError, SweepConfig, load_config
from pretrain.faults import REQUEUE_EXIT_CODE
from pretrain.model import GPT


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: list[str]  # on top of the base config
    config: Config  # the base config with the overrides: validated before any run starts
    parameters: int  # without embeddings
    tokens: int


def non_embedding_parameters(config: Config) -> int:
    with torch.device("meta"):  # counts only: no memory for the weights
        return GPT(config.model).num_parameters(include_embeddings=False)


def expand(sweep: SweepConfig) -> list[SweepRun]:
    """Every (size, budget, seed) of the sweep, in the spec's order."""
    runs = []
    for size in sweep.sizes:
        shape = [f"model.n_layer={size.n_layer}", f"model.d_model={size.d_model}", f"model.n_head={size.n_head}"]
        sized = load_config(sweep.base, [*sweep.overrides, *shape])
        parameters = non_embedding_parameters(sized)
        lr = size.lr or sweep.lr or sized.train.lr
        for multiple in sweep.tokens_per_parameter:
            tokens_per_step = sized.train.global_batch_tokens
            steps = max(1, math.ceil(multiple * parameters / tokens_per_step))
            for seed in sweep.seeds:
                name = f"{sweep.name}-l{size.n_layer}-d{size.d_model}-tpp{multiple:g}-s{seed}"
                tags = f"[{sweep.name}, 'n={parameters}', 'tpp={multiple:g}', 'seed={seed}']"
                overrides = [
                    *sweep.overrides, *shape, f"name={name}", f"output_dir={Path(sweep.output_dir) / sweep.name}",
                    f"train.max_steps={steps}", f"train.lr={lr}", f"seed={seed}",
                    f"logging.wandb_group={sweep.name}", f"logging.wandb_tags={tags}",
                ]
                config = load_config(sweep.base, overrides)
                runs.append(SweepRun(name, overrides, config, parameters, steps * tokens_per_step))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{sweep.name}: two runs would share a name; make the sizes, budgets and seeds distinct")
    return runs


def finished(config: Config) -> bool:
    checkpoint = newest_complete(config.run_dir)
    return checkpoint is not None and read_marker(checkpoint)["step"] == config.train.max_steps


def run_sweep(sweep: SweepConfig, launch_run, launch_args: argparse.Namespace, dry_run: bool) -> int:
    """Run every run not finished yet through `launch_run` (launch's `run`), then fit what finished."""
    runs = expand(sweep)
    print(f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.sizes)} sizes x {len(sweep.tokens_per_parameter)}"
          f" budgets x {len(sweep.seeds)} seeds)")
    failed = []
    for index, run in enumerate(runs, start=1):
        config = run.config
        about = f"[{index}/{len(runs)}] {run.name}: N={run.parameters:,}, D={run.tokens:,}"
        if finished(config):
            print(f"{about}: finished, skipped")
            continue
        resuming = newest_complete(config.run_dir) is not None
        print(f"{about}: {'resuming' if resuming else 'starting'}", flush=True)
        arguments = argparse.Namespace(**{**vars(launch_args), "config": sweep.base, "overrides": run.overrides,
                                          "dry_run": dry_run})
        code = launch_run(arguments, ["run", "--config", sweep.base, *run.overrides])
        if code == REQUEUE_EXIT_CODE:  # stopped on a signal (Ctrl-C, preemption): it saved a checkpoint
            print(f"{about}: interrupted; run the sweep again to resume it and go on", flush=True)
            return code
        if code != 0:
            failed.append(run.name)
            print(f"{about}: exited with {code}; the sweep goes on, and a rerun resumes it", flush=True)
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} run(s) did not finish: {', '.join(failed)}; run the sweep again")
        return 1
    if dry_run or launch_args.backend == "slurm":  # submitted runs finish later: fit them then
        return 0
    sweep_dir = Path(sweep.output_dir) / sweep.name
    print(f"sweep {sweep.name}: every run finished; fitting", flush=True)
    from evals.__main__ import main as evals_main

    return evals_main(["scaling", "--runs", str(sweep_dir), "--out", str(sweep_dir / "scaling"),
                       *(["--holdout", str(len(runs) // 4)] if len(runs) >= 8 else [])])
