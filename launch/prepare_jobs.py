"""`python -m launch prepare`: a config's data prepared here, by processes, or on SLURM, by a job array whose
tasks take the partitions and then a job that writes the manifest. Both work in the same staging folder and
give the same bytes (data_pipeline/prepare.py); running the command again finishes what a failure left.

The jobs' own steps run `python -m launch.prepare_jobs --step ...`: this module imports neither torch nor
DeepSpeed, which every array task would otherwise load (seconds each, more from a shared filesystem) only to
tokenize text.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, at_least_one, run_command
from data_pipeline.common.errors import ConfigError
from data_pipeline.manifest import MANIFEST, Manifest
from data_pipeline.partitions import PARTITIONS, Claims
from data_pipeline.prepare import (
    begin_preparation,
    finish_preparation,
    prepare,
    prepare_partitions,
    staging_dir,
)
from launch import slurm
from pretrain.config import Config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config; its data section (and model.vocab_size) is used")
    parser.add_argument("--backend", choices=("local", "slurm"), default="local")
    parser.add_argument("--tasks", type=int, help="local: processes (default data.workers); slurm: array tasks,"
                        " each claiming whole partitions as it can take them (default one per partition)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (slurm: the sbatch scripts)")
    parser.add_argument("--step", choices=("partitions", "manifest"),
                        help="one step of a SLURM preparation (what its jobs run)")
    parser.add_argument("--task", type=int, help="with --step partitions: this task's number, which its claims on"
                        " partitions carry (default $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def job_claims(data_dir: Path, task: int | None) -> Claims | None:
    """The claims of this SLURM job's tasks (None outside SLURM: this process writes every partition left)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    task = task if task is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    return Claims(staging_dir(data_dir) / PARTITIONS / f"claims-{job}", f"task {task}")


def slurm_log_dir(data_dir: Path) -> Path:
    """Where a SLURM preparation's scripts and logs go: beside the data, not in it."""
    return data_dir.with_name(f".{data_dir.name}.slurm")


def ready(manifest: Manifest) -> int:
    print(f"{manifest.dir / MANIFEST}: ready")
    return 0


def prepare_command(args: argparse.Namespace, config: Config) -> int:
    data, vocab_size = config.data, config.model.vocab_size
    if args.tasks is not None:
        at_least_one("tasks", args.tasks)
    if args.step == "partitions":  # what each task of the SLURM job array runs
        prepare_partitions(data, vocab_size, job_claims(Path(data.dir), args.task))
        return 0
    if args.step == "manifest":  # what the job after the array runs
        return ready(finish_preparation(data, vocab_size))
    if args.backend == "local":
        processes = args.tasks or data.workers or os.cpu_count() or 1
        if args.dry_run:
            print(f"would prepare {data.dir}: {data.partitions} partitions over {processes} processes, working in"
                  f" {staging_dir(Path(data.dir))}")
            return 0
        return ready(prepare(data.model_copy(update={"workers": processes}), vocab_size))
    return submit_preparation(args, config)


def submit_preparation(args: argparse.Namespace, config: Config) -> int:
    data = config.data
    tasks = args.tasks or data.partitions
    if tasks > data.partitions:
        raise ConfigError(f"--tasks: {tasks} tasks for {data.partitions} partitions would leave tasks idle; raise"
                          " data.partitions (it changes the shards) or ask for fewer tasks")
    config_path = Path(args.config) if args.config else None
    log_dir = slurm_log_dir(Path(data.dir))
    array_script = slurm.render_preparation(config, config_path, args.overrides, Path.cwd(), log_dir, tasks)
    if args.dry_run:
        print(array_script)
        print(slurm.render_preparation(config, config_path, args.overrides, Path.cwd(), log_dir, None,
                                       after="ARRAY_JOB_ID"))
        return 0
    if Path(data.dir).exists():
        return ready(prepare(data, config.model.vocab_size))  # checks it is this recipe's
    begin_preparation(data, config.model.vocab_size)  # the tokenizer, here, before any task needs it
    array_id, _ = slurm.submit(array_script, log_dir)
    manifest_script = slurm.render_preparation(config, config_path, args.overrides, Path.cwd(), log_dir, None,
                                               after=array_id)
    manifest_id, _ = slurm.submit(manifest_script, log_dir)
    print(f"submitted job array {array_id} ({tasks} tasks for {data.partitions} partitions) and job {manifest_id}"
          f" (the manifest, once every task succeeded); logs in {log_dir}; {data.dir} appears when it is done. If a"
          " task fails, run this command again: it submits what is left")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m launch.prepare_jobs")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return prepare_command(args, load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_command(main)
