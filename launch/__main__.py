"""Start a run anywhere, with one command and one config:

    python -m launch run --config CONFIG [--backend local|hostfile|slurm] [--nodes N] [--gpus-per-node G]
                         [--ranks R] [--hostfile FILE] [--hostfile-launcher torchrun|deepspeed] [--dry-run]
                         [KEY=VALUE ...]
    python -m launch sweep --spec configs/sweeps/micro.yaml [--parallel K] [the same options, for every run]
    python -m launch plan --config CONFIG --gpus N [--gpu-memory 80GiB] [KEY=VALUE ...]

The config is validated here, for the world size the run will have, and the data is prepared (once) and its
shards checked, before any training process starts: a bad request costs one line and exit code 2, bad data
or an unusable checkpoint one line and exit code 1, not a cluster allocation. `--dry-run` prints exactly what
would run and starts nothing. Where the GPUs' memory is known (a GPU here, or `--gpu-memory`), a run whose memory
plan does not fit is refused with the plan's line, and `--dry-run` prints the plan. `python -m launch node` is
the per-node step the sbatch script runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import socket
import sys
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, at_least_one, run_command
from data_pipeline.common.errors import ConfigError
from data_pipeline.common.files import write_atomically
from data_pipeline.common.redaction import redact_text
from launch import hostfile, planner, prepare_jobs, slurm
from launch.local import (
    DEFAULT_CPU_RANKS,
    Rendezvous,
    gpus_here,
    run_node,
    torchrun_command,
)
from launch.record import record_launch
from launch.sweep import run_sweep
from launch.sweep_spec import load_sweep
from pretrain.checkpoint_store import (
    refuse_to_train_over_checkpoints,
    resume_plan,
    resume_position,
    starting_checkpoint,
)
from pretrain.config import Config, deepspeed_config, load_config
from pretrain.device import device_here, resolve_precision
from pretrain.run_data import VERIFIED_DATA_VARIABLE, prepare_and_verify
from pretrain.runlock import RunLock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m launch")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    run = commands.add_parser("run", help="train a model here, across hosts, or on SLURM")
    run.add_argument("--config", help="YAML config (configs/quickstart.yaml for the quickstart)")
    sweep = commands.add_parser("sweep", help="run every run of a scaling sweep not finished yet, then fit it")
    sweep.add_argument("--spec", required=True, help="a sweep spec (configs/sweeps/*.yaml)")
    for command in (run, sweep):
        command.add_argument("--backend", choices=("local", "hostfile", "slurm"), default="local")
        command.add_argument("--nodes", type=int, help="nodes (slurm); the first N hosts of the hostfile (hostfile)")
        command.add_argument("--gpus-per-node", type=int, help="default: every GPU here (local), none asked (slurm)")
        command.add_argument("--ranks", type=int, help="processes per node where there are no GPUs (default 2)")
        command.add_argument("--hostfile", type=Path, help="hostfile backend: lines of `host slots=N`")
        command.add_argument("--hostfile-launcher", choices=("torchrun", "deepspeed"), default="torchrun",
                             help="torchrun: run this command on every host; deepspeed: on the first, pdsh/ssh"
                             " reaches the rest")
        command.add_argument("--dry-run", action="store_true", help="print what would run; start and submit nothing")
        command.add_argument("--gpu-memory", type=planner.parse_memory,
                             help="memory of one GPU, e.g. 80GiB: refuse a run whose memory plan does not fit it"
                             " (default: this host's GPU, if any; SLURM and CPU runs are not checked without it)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    sweep.add_argument("--parallel", type=int,
                       help="runs at once: local runs side by side (their ranks share this machine), or SLURM"
                       " array tasks at once (default: 1 locally, as many as SLURM allows there)")
    node = commands.add_parser("node", help="one node's share of a multi-node run (what the sbatch script runs)")
    node.add_argument("--config")
    node.add_argument("--nodes", type=int, required=True)
    node.add_argument("--ranks-per-node", type=int, required=True)
    node.add_argument("--rendezvous", required=True, metavar="HOST:PORT")
    node.add_argument("--rendezvous-id", required=True)
    node.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    prepare = commands.add_parser("prepare", help="tokenize and shard a config's data now (training does it on"
                                  " first use otherwise)")
    prepare_jobs.add_arguments(prepare)
    plan = commands.add_parser("plan", help="memory per GPU by ZeRO stage, and the micro-batch that fits")
    planner.add_arguments(plan)
    return parser.parse_args(argv)


def ranks_per_node(args: argparse.Namespace, gpus_available: int | None) -> int:
    """Processes per node: one per GPU, or --ranks CPU processes. `gpus_available` is None for remote nodes."""
    at_least_one("ranks", args.ranks)
    if args.gpus_per_node is not None:
        at_least_one("gpus-per-node", args.gpus_per_node)
        if gpus_available is not None and args.gpus_per_node > gpus_available:
            raise ConfigError(f"--gpus-per-node: {args.gpus_per_node} requested, this host has {gpus_available} GPU(s)")
        return args.gpus_per_node
    if args.ranks is not None:
        return args.ranks
    return gpus_available or DEFAULT_CPU_RANKS


def check_config(config: Config, world_size: int, remote_gpus: bool | None) -> None:
    """What can be known before anything starts: the batch layout, the DeepSpeed config, resume=never."""
    layout = config.batch_layout(world_size)
    requested = config.deepspeed.precision
    if remote_gpus is None:
        precision = resolve_precision(requested, device_here())
    else:  # SLURM nodes: their devices cannot be asked from here
        precision = requested if requested != "auto" else ("bf16" if remote_gpus else "fp32")
    deepspeed_config(config, layout, precision)
    refuse_to_train_over_checkpoints(config)


def slurm_layout(args: argparse.Namespace, config: Config) -> tuple[int, int]:
    """(nodes, ranks per node) of a SLURM job, with the config checked for that world size."""
    at_least_one("nodes", args.nodes)
    nodes = args.nodes or 1
    per_node = ranks_per_node(args, None)
    check_config(config, nodes * per_node, bool(args.gpus_per_node))
    return nodes, per_node


def check_memory(config: Config, world_size: int, gpu_memory: int | None, dry_run: bool) -> None:
    """Where the GPUs' memory is known: refuse a run whose memory plan does not fit (printing the plan on a dry
    run)."""
    if not gpu_memory:
        return
    plan = planner.make_plan(config, world_size, gpu_memory, planner.gpu_precision(config))
    if dry_run:
        print(planner.render(plan))
    if not plan.fits:
        raise ConfigError(plan.recommendation)


def check_checkpoint(config: Config, world_size: int) -> None:
    resume_from = starting_checkpoint(config)
    if resume_from is not None:
        resume_plan(resume_from, world_size, config.deepspeed.zero_stage)
        resume_position(resume_from, config)


def show(commands: list[list[str]]) -> str:
    return "\n".join(shlex.join(command) for command in commands)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    at_least_one("nodes", args.nodes)
    config = load_config(args.config, args.overrides)
    environment = dict(config.launch.environment)
    hosts: list[hostfile.Host] = []
    if args.backend == "local":
        if args.nodes not in (None, 1):
            raise ConfigError("--nodes: the local backend runs on this machine only; use --backend hostfile or slurm")
        per_node = ranks_per_node(args, gpus_here())
        world_size = ranks_here = per_node
        first_host = True
        check_config(config, world_size, None)
        commands = [torchrun_command(per_node, args.config, args.overrides)]
    elif args.backend == "hostfile":
        if args.hostfile is None:
            raise ConfigError("--hostfile: the hostfile backend needs one (lines of `host slots=N`)")
        hosts = hostfile.read_hostfile(args.hostfile)
        if args.nodes is not None:
            if args.nodes > len(hosts):
                raise ConfigError(f"--nodes: {args.nodes} requested, {args.hostfile} lists {len(hosts)} host(s)")
            hosts = hosts[: args.nodes]
        hostfile.check_reachable(hosts)
        world_size = sum(host.slots for host in hosts)
        check_config(config, world_size, None)
        port = config.launch.rendezvous_port
        if args.hostfile_launcher == "deepspeed":
            first_host = hostfile.this_host(hosts, args.hostfile) == 0 if not args.dry_run else True
            if not first_host:
                raise ConfigError(f"--hostfile-launcher deepspeed: run it on the first host of {args.hostfile}")
            commands = [hostfile.deepspeed_command(args.hostfile, hosts, port, args.config, args.overrides)]
            ranks_here = hosts[0].slots
        else:
            here = hostfile.this_host(hosts, args.hostfile)
            first_host, ranks_here = here == 0, hosts[here].slots
            rendezvous = Rendezvous(len(hosts), f"{hosts[0].name}:{port}", config.name)
            commands = [torchrun_command(ranks_here, args.config, args.overrides, rendezvous)]
    else:
        nodes, per_node = slurm_layout(args, config)
        world_size, first_host = nodes * per_node, True
        script = slurm.render_sbatch(config, Path(args.config) if args.config else None, args.overrides, nodes,
                                     args.gpus_per_node or 0, per_node, Path.cwd())
    gpus_seen = planner.gpu_memory_here() if args.backend != "slurm" else None  # SLURM's GPUs are elsewhere
    check_memory(config, world_size, args.gpu_memory or gpus_seen, args.dry_run)
    check_checkpoint(config, world_size)

    if args.dry_run:
        print(script if args.backend == "slurm" else redact_text(show(commands)))
        return 0
    if first_host and args.backend != "slurm":
        # Another job training this run is refused here, before any work (rank 0 holds the lock for the run).
        RunLock.refuse_if_held(config.run_dir)
    if first_host:  # the other hosts' rank 0 is elsewhere; it prepares what is missing, once
        manifest = prepare_and_verify(config, is_main=True, log=print)
        environment[VERIFIED_DATA_VARIABLE] = manifest.fingerprint
    host_names = [host.name for host in hosts]
    if args.backend == "slurm":
        job_id, script_path = slurm.submit(script, config.run_dir / "slurm")
        record_launch(config.run_dir, "slurm", argv, script, host_names, config.launch.environment)
        print(f"submitted job {job_id}: script {script_path}, log {slurm.log_path(config.run_dir, job_id)},"
              f" run directory {config.run_dir}")
        return 0
    record_launch(config.run_dir, args.backend, argv, commands, host_names, config.launch.environment)
    if args.backend == "hostfile" and args.hostfile_launcher == "deepspeed":
        environment_file = config.run_dir / "launches" / "deepspeed_env"  # what DeepSpeed exports to every host
        lines = "".join(f"{name}={value}\n" for name, value in config.launch.environment.items())
        write_atomically(environment_file, lines)
        environment["DS_ENV_FILE"] = str(environment_file)
    return run_node(commands[0], environment, ranks_here, config.run_dir)


def node(args: argparse.Namespace, argv: list[str]) -> int:
    at_least_one("nodes", args.nodes)
    at_least_one("ranks-per-node", args.ranks_per_node)
    config = load_config(args.config, args.overrides)
    rendezvous = Rendezvous(args.nodes, args.rendezvous, args.rendezvous_id)
    command = torchrun_command(args.ranks_per_node, args.config, args.overrides, rendezvous)
    # The sbatch script exported the configured variables; record what this node actually received.
    received = {name: os.environ[name] for name in config.launch.environment if name in os.environ}
    record_launch(config.run_dir, "node", argv, [command], [socket.gethostname()], received)
    return run_node(command, dict(config.launch.environment), args.ranks_per_node, config.run_dir)


def submit_array(args: argparse.Namespace, argv: list[str], config_path: str, configs: list[Config],
                 array: slurm.ArrayJob) -> str | None:
    """Submit runs (the config file plus each run's overrides) as one SLURM job array; returns the job id (None for
    --dry-run, which prints the script). Every run is checked first, as `run` checks one; a run that waits for
    another array (array.after) is not asked for its starting checkpoint, which does not exist yet."""
    for config in configs:
        nodes, per_node = slurm_layout(args, config)
        try:
            check_memory(config, nodes * per_node, args.gpu_memory, dry_run=False)
        except ConfigError as refused:
            raise ConfigError(f"{config.name}: {refused}") from None
        if array.after is None:
            check_checkpoint(config, nodes * per_node)
    script = slurm.render_sbatch(configs[0], Path(config_path), [], nodes, args.gpus_per_node or 0, per_node,
                                 Path.cwd(), array)
    if args.dry_run:
        print(script)
        return None
    job_id, script_path = slurm.submit(script, array.log_dir)
    for config in configs:
        record_launch(config.run_dir, "slurm", argv, script, [], config.launch.environment)
    print(f"submitted job array {job_id} ({len(configs)} runs"
          + (f", after job {array.after} succeeds" if array.after else "")
          + f"): script {script_path}; run i logs to RUN/slurm/{job_id}_i.out", flush=True)
    return job_id


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    at_least_one("nodes", args.nodes)
    at_least_one("parallel", args.parallel)
    spec = load_sweep(args.spec)
    launch_args = argparse.Namespace(**{key: value for key, value in vars(args).items() if key != "spec"})
    return run_sweep(spec, launch_args, functools.partial(submit_array, launch_args, argv))


def prepare_data(args: argparse.Namespace, _argv: list[str]) -> int:
    return prepare_jobs.prepare_command(args, load_config(args.config, args.overrides))


def plan_memory(args: argparse.Namespace, _argv: list[str]) -> int:
    return planner.plan_command(args, load_config(args.config, args.overrides))


COMMANDS = {"run": run, "sweep": sweep, "node": node, "prepare": prepare_data, "plan": plan_memory}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return COMMANDS[args.command](args, argv)


if __name__ == "__main__":
    run_command(main)
