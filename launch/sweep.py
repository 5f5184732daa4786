"""A scaling sweep: one spec expanded into runs with stable names, started through the launch backends,
skipping those that finished and resuming those that did not, then fitted.

    python -m launch sweep --spec configs/sweeps/micro.yaml [--backend local|hostfile|slurm] [--parallel K]
                           [--ranks R] [--dry-run] [the other `launch run` options, for every run]

Each run is the spec's base config with the spec's overrides, then its size (n_layer, d_model, n_head), its
learning rate, its seed, and its token budget: a multiple of its non-embedding parameter count N, or a compute
budget C trained on C / (6 N) tokens (isoFLOP profiles), rounded up to whole steps. Runs go to
OUTPUT_DIR/<sweep>/<run> and share one W&B group named after the sweep, with size, budget and seed as tags.

How the runs start:
- local and hostfile: `python -m launch run` for each, one after another, or --parallel K side by side (local;
  each run's output then goes to RUN/sweep.log). A signal to the sweep reaches every run, which checkpoints and
  stops; no run starts after it, and the sweep exits with the requeue code. The fit follows the last run.
- slurm: one job array of the runs not finished (--parallel K: at most K tasks at once). Run the same command
  again once the array is done: it skips the finished runs, resubmits the others, and fits when none is left.

With decay_branches (train.schedule=wsd), each size and seed trains its largest budget once (the trunk),
checkpointing where the decay of each smaller budget begins; each smaller budget is a run that starts from that
checkpoint and only decays, as a separate run with the same stable phase would have done. On SLURM the branches
are a second array that starts once every trunk has succeeded.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from data_pipeline.common.errors import REQUEUE_EXIT_CODE, ConfigError
from data_pipeline.common.files import write_atomically
from data_pipeline.common.redaction import redact_text
from evals.commands.fit_runs import FitSettings, TaskFitSettings, WandbTarget, fit_runs
from launch.local import DEFAULT_CPU_RANKS, gpus_here
from launch.slurm import ArrayJob
from launch.sweep_spec import SweepConfig, SweepRun, SweepSize, sweep_targets
from pretrain.checkpoint_store import (
    CheckpointError,
    newest_complete,
    starting_checkpoint,
    tag_for_step,
)
from pretrain.config import Config, load_config
from pretrain.faults import PREEMPTION_SIGNALS
from pretrain.run_data import prepare_and_verify
from pretrain.rundir.points import non_embedding_parameters
from pretrain.rundir.reader import finished_with

# Submits runs as one SLURM job array: (config path, the runs' configs, the array) -> job id.
SubmitArray = Callable[[str, list[Config], ArrayJob], "str | None"]


def _budgets(sweep: SweepConfig, parameters: int, tokens_per_step: int) -> list[tuple[str, str, int]]:
    """Each token budget of the sweep for a model of `parameters`: (its part of run names, its W&B tag, steps)."""
    if sweep.tokens_per_parameter:
        return [(f"tpp{multiple:g}", f"tpp={multiple:g}", max(1, math.ceil(multiple * parameters / tokens_per_step)))
                for multiple in sweep.tokens_per_parameter]
    return [(f"c{flops:.3g}".replace("e+0", "e").replace("e+", "e"), f"C={flops:.3g}",
             max(1, math.ceil(flops / (6 * parameters) / tokens_per_step))) for flops in sweep.compute_budgets]


def _run_name(sweep: SweepConfig, size: SweepSize, budget: str, seed: int) -> str:
    return f"{sweep.name}-l{size.n_layer}-d{size.d_model}-{budget}-s{seed}"


def expand(sweep: SweepConfig) -> list[SweepRun]:
    """Every (size, seed, budget) of the sweep, in the spec's order; with decay branches, each trunk first."""
    runs = []
    sweep_dir = Path(sweep.output_dir) / sweep.name
    for size in sweep.sizes:
        shape = [f"model.n_layer={size.n_layer}", f"model.d_model={size.d_model}", f"model.n_head={size.n_head}"]
        sized = load_config(sweep.base, [*sweep.overrides, *shape])
        if sweep.decay_branches and sized.train.schedule != "wsd":
            raise ConfigError(f"{sweep.name}: decay_branches needs train.schedule=wsd, and the base config with the"
                              f" sweep's overrides gives {sized.train.schedule!r}; add train.schedule=wsd to them")
        parameters = non_embedding_parameters(sized)
        lr = size.lr or sweep.lr or sized.train.lr
        tokens_per_step = sized.train.global_batch_tokens
        budgets = _budgets(sweep, parameters, tokens_per_step)
        trunk = max(budgets, key=lambda budget: budget[2]) if sweep.decay_branches else None
        # A branch leaves the trunk where its own decay begins: until then the two runs are the same run.
        branch_points = {part: steps - max(1, round(sized.train.decay_fraction * steps))
                         for part, _, steps in budgets if trunk and part != trunk[0]}
        branch_points = {part: step for part, step in branch_points.items() if step >= 1}
        ordered = sorted(budgets, key=lambda budget: budget != trunk) if trunk else budgets
        for seed in sweep.seeds:
            for part, tag, steps in ordered:
                name = _run_name(sweep, size, part, seed)
                # An override is YAML text after "=": dumped by the YAML library, so any sweep name reads back.
                tags = yaml.safe_dump([sweep.name, f"n={parameters}", tag, f"seed={seed}"], default_flow_style=True,
                                      width=2**16).strip()
                overrides = [
                    *sweep.overrides, *shape, f"name={name}", f"output_dir={sweep_dir}",
                    f"train.max_steps={steps}", f"train.lr={lr}", f"seed={seed}",
                    f"logging.wandb_group={sweep.name}", f"logging.wandb_tags={tags}",
                ]
                trunk_name, branch_step = None, 0
                if trunk and part == trunk[0] and branch_points:
                    # Kept whatever keep_checkpoints says: the branches start there.
                    overrides.append(f"train.checkpoint_steps={sorted(set(branch_points.values()))}")
                elif part in branch_points:
                    trunk_name, branch_step = _run_name(sweep, size, trunk[0], seed), branch_points[part]
                    branch_point = sweep_dir / trunk_name / "checkpoints" / tag_for_step(branch_step)
                    overrides.append(f"train.branch_from={branch_point}")
                config = load_config(sweep.base, overrides)
                runs.append(SweepRun(name, overrides, config, parameters, steps * tokens_per_step, trunk_name,
                                     branch_step))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{sweep.name}: two runs would share a name; make the sizes, budgets and seeds distinct")
    return runs


def can_start(run: SweepRun) -> bool:
    """Whether the run's starting point exists: always, except for a branch whose trunk has not reached it."""
    try:
        starting_checkpoint(run.config)
        return True
    except CheckpointError:
        return False


def why_blocked(run: SweepRun, unfinished: list[str]) -> str:
    """Why a decay branch cannot start, and what to do, where its trunk is not going to run (now)."""
    if run.trunk in unfinished:
        return f"its trunk {run.trunk} did not finish; run the sweep again to resume both"
    trunk_dir = Path(run.config.train.branch_from).parent.parent
    return (f"its trunk {run.trunk} finished without the checkpoint it starts from ({run.config.train.branch_from}),"
            f" as when the spec's budgets changed after the trunk ran; remove {trunk_dir} to train the trunk again")


def launch_options(args: argparse.Namespace) -> list[str]:
    """The `launch run` options the sweep was given, for each of its runs."""
    options = ["--backend", args.backend, "--hostfile-launcher", args.hostfile_launcher]
    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--ranks", args.ranks),
                          ("--hostfile", args.hostfile), ("--gpu-memory", args.gpu_memory)):
        if value is not None:
            options += [option, str(value)]
    return options


def side_by_side_environments(parallel: int, ranks: int | None) -> list[dict[str, str]]:
    """The environment of each of `parallel` runs on this machine: on GPUs, each run its own share of them (a
    run takes every GPU it sees); on CPUs, each rank its share of the cores."""
    gpus = gpus_here()
    if not gpus:
        threads = max(1, (os.cpu_count() or 1) // ((ranks or DEFAULT_CPU_RANKS) * parallel))
        return [{"OMP_NUM_THREADS": str(threads)}] * parallel
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(index) for index in range(gpus)]
    if len(devices) < parallel:
        raise ConfigError(f"--parallel: {parallel} runs side by side need a GPU each, and this machine has"
                          f" {len(devices)}; run at most {len(devices)} at once")
    share = len(devices) // parallel
    threads = max(1, (os.cpu_count() or 1) // (share * parallel))
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[slot * share:(slot + 1) * share]),
             "OMP_NUM_THREADS": str(threads)} for slot in range(parallel)]


# A hangup (the terminal or ssh session closing) stops the sweep like Ctrl-C: its runs checkpoint and stop.
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT, signal.SIGHUP)


def run_here(sweep: SweepConfig, pending: list[tuple[str, SweepRun]], args: argparse.Namespace,
             parallel: int) -> tuple[list[str], bool]:
    """Train the pending runs (each with its `[i/n] name` label), `parallel` at a time, each as `python -m launch
    run` in a session of its own; returns the names that did not finish, and whether a signal stopped the sweep."""
    waiting, running, failed, stopped_by = list(pending), {}, [], []
    free_slots = side_by_side_environments(parallel, args.ranks) if parallel > 1 else [{}]

    def forwarded(signal_number: int) -> int:
        # Each run's launcher checkpoints on SIGTERM or SIGUSR1 (a preemption warning, passed on as it is).
        return signal_number if signal_number in PREEMPTION_SIGNALS else signal.SIGTERM

    def stop(signal_number: int, _frame) -> None:
        stopped_by.append(forwarded(signal_number))
        for job in running:
            job.send_signal(forwarded(signal_number))

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        while waiting or running:
            for job, (label, run, slot) in list(running.items()):
                if job.poll() is None:
                    continue
                del running[job]
                free_slots.append(slot)
                if job.returncode == REQUEUE_EXIT_CODE or (stopped_by and job.returncode != 0):
                    # Stopped on a signal: it saved a checkpoint, unless the signal came before it had started.
                    print(f"{label}: interrupted; run the sweep again to resume it and go on", flush=True)
                    failed.append(run.name)
                elif job.returncode != 0:
                    failed.append(run.name)
                    print(f"{label}: exited with {job.returncode}; the sweep goes on, and a rerun resumes it",
                          flush=True)
                else:
                    print(f"{label}: finished", flush=True)
            active = {run.name for _, run, _ in running.values()} | {run.name for _, run in waiting}
            for label, run in list(waiting):
                if stopped_by or not free_slots:
                    break
                if not can_start(run):
                    if run.trunk not in active:  # it will not start: its trunk stopped short of the branch point
                        waiting.remove((label, run))
                        print(f"{label}: not started: {why_blocked(run, failed)}", flush=True)
                        failed.append(run.name)
                    continue
                waiting.remove((label, run))
                resuming = newest_complete(run.config.run_dir) is not None
                log = run.config.run_dir / "sweep.log"
                print(f"{label}: {'resuming' if resuming else 'starting'}"
                      + (f" (output: {log})" if parallel > 1 else ""), flush=True)
                command = [sys.executable, "-m", "launch", "run", "--config", sweep.base, *launch_options(args),
                           *run.overrides]
                output = None
                if parallel > 1:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    output = log.open("a")
                slot = free_slots.pop(0)
                environment = {**slot, **os.environ}  # a thread count set by hand wins; the GPU share does not
                environment.update({name: slot[name] for name in ("CUDA_VISIBLE_DEVICES",) if name in slot})
                job = subprocess.Popen(command, env=environment, stdout=output, stderr=output, start_new_session=True)
                running[job] = (label, run, slot)
                if stopped_by:  # the signal came while it started, before `stop` could see it
                    job.send_signal(stopped_by[-1])
                if output:
                    output.close()  # the run holds its own copy
            if stopped_by and not running:
                break
            time.sleep(0.2)
    except BaseException:
        for job in running:  # in their own sessions, they would go on training unsupervised
            job.terminate()
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return failed, bool(stopped_by)


QUEUED_RECORD = "queued.json"  # in runs/<sweep>/slurm/: the jobs the last submission queued


def still_queued(log_dir: Path) -> list[str]:
    """The jobs of the sweep's last submission that SLURM still lists as pending or running."""
    record = log_dir / QUEUED_RECORD
    if not record.is_file():
        return []
    submitted = json.loads(record.read_text())["jobs"]
    listed = subprocess.run(["squeue", "--noheader", "--format=%F", f"--user={getpass.getuser()}"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        print(f"warning: squeue failed ({listed.stderr.strip()}); cannot tell whether jobs {submitted} still run")
        return []
    return [job for job in submitted if job in listed.stdout.split()]


def submit_arrays(sweep: SweepConfig, pending: list[tuple[str, SweepRun]], parallel: int | None,
                  submit_array: SubmitArray) -> list[str]:
    """The pending runs that can start, as one SLURM job array; then the decay branches of each trunk among
    them as an array that starts once that trunk's task has succeeded, and is cancelled if it fails. Returns
    the runs left out, with why: a branch whose trunk is neither finished nor pending."""
    startable = {run.name: can_start(run) for _, run in pending}
    first = [run for _, run in pending if startable[run.name]]
    position = {run.name: index for index, run in enumerate(first)}
    branches: dict[str, list[SweepRun]] = {}
    for _, run in pending:
        if not startable[run.name] and run.trunk in position:
            branches.setdefault(run.trunk, []).append(run)
    log_dir = Path(sweep.output_dir) / sweep.name / "slurm"
    queued: list[str] = []

    def submit(runs: list[SweepRun], name: str, after: str | None) -> str | None:
        for index, run in enumerate(runs):
            print(f"  {name} task {index}: {run.name}" + (f" (after job {after})" if after else ""))
        array = ArrayJob(name, [run.config.run_dir for run in runs], [run.overrides for run in runs], log_dir,
                         parallel, after)
        try:
            job = submit_array(sweep.base, [run.config for run in runs], array)
        except ConfigError as error:
            if queued:
                raise ConfigError(f"{error}; already queued: job(s) {', '.join(queued)} (scancel them, or let them"
                                  " run and run the sweep again to submit the rest)") from None
            raise
        if job is not None:
            queued.append(job)
            log_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(log_dir / QUEUED_RECORD, json.dumps({"jobs": queued}) + "\n")
        return job

    first_job = submit(first, sweep.name, None) if first else None
    for trunk, its_branches in branches.items():
        # A dry run has no job id yet: the script shows where it would go.
        submit(its_branches, f"{sweep.name}-branches", f"{first_job or '<job>'}_{position[trunk]}")
    return [f"{run.name} ({why_blocked(run, [])})" for _, run in pending
            if not startable[run.name] and run.trunk not in position]


def prepare_data(runs: list[SweepRun]) -> None:
    """Prepare each dataset the runs use, once, here: runs side by side or on SLURM would race to prepare it."""
    prepared = set()
    for run in runs:
        dataset = run.config.data.model_dump_json()
        if dataset not in prepared:
            prepare_and_verify(run.config, is_main=True, log=print)
            prepared.add(dataset)


def run_sweep(sweep: SweepConfig, args: argparse.Namespace, submit_array: SubmitArray) -> int:
    """Start every run not finished yet on the chosen backend; once all have finished, fit them."""
    runs = expand(sweep)
    targets = sweep_targets(sweep, runs)
    budgets = len(sweep.tokens_per_parameter or sweep.compute_budgets)
    print(f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.sizes)} sizes x {budgets} budgets x"
          f" {len(sweep.seeds)} seeds)")
    if sweep.decay_branches:
        separately = sum(run.config.train.max_steps for run in runs)
        branched = sum(run.config.train.max_steps - run.branch_step for run in runs)
        print(f"decay branches: {branched:,} steps to train instead of {separately:,} ({1 - branched / separately:.0%}"
              " fewer)")
    parallel = args.parallel
    if parallel and parallel > 1 and args.backend == "hostfile":
        raise ConfigError("--parallel: the hostfile backend runs one run at a time across its hosts; leave it out")
    pending, stale = [], []
    for index, run in enumerate(runs, start=1):
        label = f"[{index}/{len(runs)}] {run.name}: N={run.parameters:,}, D={run.tokens:,}"
        changed = finished_with(run.config)
        if changed is None:
            pending.append((label, run))
            continue
        stale += [run.name] if changed else []
        print(f"{label}: " + (f"stale: finished with other settings ({'; '.join(changed)}); remove"
                              f" {run.config.run_dir} to train it with these" if changed else "finished, skipped"))
    if stale:
        print(f"sweep {sweep.name}: {len(stale)} finished run(s) do not match the spec; nothing started or fitted",
              file=sys.stderr)
        return 1
    sweep_dir = Path(sweep.output_dir) / sweep.name
    if pending and not args.dry_run and (args.backend == "slurm" or (parallel or 1) > 1):
        prepare_data([run for _, run in pending])
    if pending and args.backend == "slurm":
        running = still_queued(sweep_dir / "slurm") if not args.dry_run else []
        if running:
            print(f"sweep {sweep.name}: job(s) {', '.join(running)} of its last submission are still queued or"
                  f" running (squeue -j {','.join(running)}); wait for them, or cancel them (scancel"
                  f" {' '.join(running)}), then run the sweep again", file=sys.stderr)
            return 1
        blocked = submit_arrays(sweep, pending, parallel, submit_array)
        if blocked:
            print(f"sweep {sweep.name}: not submitted: {'; '.join(blocked)}")
        if not args.dry_run:
            print(f"sweep {sweep.name}: when the jobs are done, run the same command again to fit them (or resubmit"
                  " what did not finish)")
        return 1 if blocked else 0
    if args.dry_run:
        for label, run in pending:
            overrides = redact_text(" ".join(run.overrides))
            print(f"{label}: would run python -m launch run --config {sweep.base} {overrides}")
        print(f"sweep {sweep.name}: would then fit the runs into {sweep_dir / 'scaling'}"
              + (f" and predict {', '.join(target.name for target in targets)} into {sweep_dir / 'task_scaling'}"
                 if targets else ""))
        return 0
    failed, stopped = run_here(sweep, pending, args, parallel or 1)
    if stopped:
        print(f"sweep {sweep.name}: stopped by a signal; run it again to resume and go on", flush=True)
        return REQUEUE_EXIT_CODE
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} run(s) did not finish: {', '.join(failed)}; run the sweep again")
        return 1
    print(f"sweep {sweep.name}: every run finished; fitting", flush=True)
    logging = runs[0].config.logging
    tasks = TaskFitSettings(out=sweep_dir / "task_scaling", runs=[sweep_dir], targets=targets,
                            bootstrap=sweep.bootstrap, holdout_largest=sweep.can_hold_out_largest) if targets else None
    fit_runs(FitSettings(out=sweep_dir / "scaling", runs=[sweep_dir], bootstrap=sweep.bootstrap,
                         holdout=len(runs) // 4 if len(runs) >= 8 else 0),
             WandbTarget(sweep.name, logging.wandb_project, logging.wandb_entity, logging.wandb_mode), tasks)
    return 0

