"""SLURM: render an sbatch script for a run (or the steps of a data preparation), and submit it.

The script asks SLURM to send SIGUSR1 to every process of the job `preemption_warning_seconds` before its time
limit; the ranks checkpoint and exit with REQUEUE_EXIT_CODE, and the script requeues the job, which resumes
with train.resume=auto. Every value that reaches the script is quoted for the shell (or refused where it
would sit on an #SBATCH line), so no config value can run as shell code. A credential in a value (a signed
data.shard_url, a password in a pipe: command) reaches sbatch on its standard input only: the script printed,
kept beside the job and recorded has it redacted.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import REQUEUE_EXIT_CODE, ConfigError
from data_pipeline.common.files import write_atomically
from data_pipeline.common.redaction import redact_text
from pretrain.config import Config


def _sbatch_line(option: str, value: object | None = None) -> str:
    """`#SBATCH --option=value` (or a bare `--option`). sbatch reads these lines, the shell skips them as
    comments; a newline would end one and start a shell command, so control characters are refused, and sbatch
    splits a line at spaces into more options (`--account=a --wrap=...`), so spaces and quotes are too."""
    line = f"#SBATCH --{option}" + ("" if value is None else f"={value}")
    if re.search(r"[\x00-\x1f\x7f]", line):
        raise ConfigError(f"launch.slurm: {line!r} holds a control character (a newline?); remove it")
    if value is not None and re.search(r"[\s\"'\\]", str(value)):
        raise ConfigError(
            f"launch.slurm: {line!r}: sbatch would split the value at its spaces or quotes into more options;"
            " use a value without them (a path: a directory whose path has none)"
        )
    return line


@dataclass(frozen=True)
class ArrayJob:
    """Several runs submitted as one SLURM job array: task i trains the run of `task_overrides[i]` (each the
    full overrides of one run, on the same config file) in `run_dirs[i]`."""

    name: str
    run_dirs: list[Path]
    task_overrides: list[list[str]]
    log_dir: Path  # where each task says which run it trains; the run's own log goes to its run directory
    parallel: int | None = None  # at most this many tasks at once (sbatch --array=...%N)
    after: str | None = None  # a job (or array task, <job>_<i>) that must succeed first: branches wait for trunks


class SbatchScript(str):
    """An sbatch script as it is printed, kept beside the job and recorded: every credential in the values it
    carries (overrides, exported variables) redacted. `runnable`, the script itself, is what `submit` gives
    sbatch, on its standard input, so that no file holds it."""

    runnable: str

    def __new__(cls, render: Callable[[Callable[[str], str]], str]) -> SbatchScript:
        """`render(shown)`: the script with each value written as shown(value)."""
        script = super().__new__(cls, render(redact_text))
        script.runnable = render(str)
        return script


def render_sbatch(config: Config, config_path: Path | None, overrides: list[str], nodes: int, gpus_per_node: int,
                  ranks_per_node: int, workdir: Path, array: ArrayJob | None = None) -> SbatchScript:
    """The sbatch script for this run (or, with `array`, for each run of a job array): SLURM options, then one
    supervised torchrun per node (mode torchrun) or one task per rank (mode tasks)."""
    return SbatchScript(functools.partial(_run_script, config, config_path, overrides, nodes, gpus_per_node,
                                          ranks_per_node, workdir, array))


def _run_script(config: Config, config_path: Path | None, overrides: list[str], nodes: int, gpus_per_node: int,
                ranks_per_node: int, workdir: Path, array: ArrayJob | None, shown: Callable[[str], str]) -> str:
    slurm = config.launch.slurm
    tasks_per_node = 1 if slurm.mode == "torchrun" else ranks_per_node
    options = {
        "job-name": slurm.job_name or (array.name if array else config.name),
        "nodes": nodes,
        "ntasks-per-node": tasks_per_node,
        "time": slurm.time,
        "output": (workdir / array.log_dir / "%A_%a.out" if array else workdir / config.run_dir / "slurm" / "%j.out"
                   ).resolve(),
        "chdir": workdir.resolve(),
        "signal": f"USR1@{slurm.preemption_warning_seconds}",
    }
    if array:
        options["array"] = f"0-{len(array.task_overrides) - 1}" + (f"%{array.parallel}" if array.parallel else "")
        if array.after:
            options["dependency"] = f"afterok:{array.after}"
            options["kill-on-invalid-dep"] = "yes"  # a failed trunk cancels its branches rather than strand them
    if gpus_per_node:
        options["gpus-per-node"] = gpus_per_node
    options.update(_placement(config))
    lines = ["#!/bin/bash"] + [_sbatch_line(option, value) for option, value in options.items()]
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += _extra_lines(config)

    def arguments(run_overrides: list[str]) -> str:
        config_args = ["--config", str(config_path.resolve())] if config_path else []
        return " ".join(shlex.quote(shown(arg)) for arg in config_args + list(run_overrides))

    python = shlex.quote(sys.executable)
    port = str(config.launch.rendezvous_port)
    environment = config.launch.environment.items()
    lines += ["", "set -u", *(f"export {name}={shlex.quote(shown(value))}" for name, value in environment)]
    if array:
        # Array tasks (of this array or another) can share a node: each meets its ranks on its own port.
        port = f"$(( {port} + SLURM_JOB_ID % 1000 ))"
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for index, (run_dir, run_overrides) in enumerate(zip(array.run_dirs, array.task_overrides)):
            log = shlex.quote(str((workdir / run_dir / "slurm").resolve())) + f'/"$SLURM_ARRAY_JOB_ID"_{index}.out'
            lines.append(f"  {index}) RUN_ARGUMENTS=({arguments(run_overrides)}); RUN_LOG={log} ;;")
        lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
                  'mkdir -p "$(dirname "$RUN_LOG")"',
                  'echo "array task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID): log $RUN_LOG"',
                  'exec >>"$RUN_LOG" 2>&1']
    else:
        lines.append(f"RUN_ARGUMENTS=({arguments(overrides)})")
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR MASTER_PORT={port}",
        f'echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, {slurm.mode} mode"',
    ]
    if slurm.mode == "torchrun":
        lines.append(
            f"srun --kill-on-bad-exit=1 {python} -m launch node --nodes \"$SLURM_NNODES\""
            f" --ranks-per-node {ranks_per_node} --rendezvous \"$MASTER_ADDR:$MASTER_PORT\""
            ' --rendezvous-id "$SLURM_JOB_ID" "${RUN_ARGUMENTS[@]}"'
        )
    else:
        lines.append(f'srun --kill-on-bad-exit=1 {python} -m pretrain.train "${{RUN_ARGUMENTS[@]}}"')
    lines += [
        "status=$?",
        f"if [ $status -eq {REQUEUE_EXIT_CODE} ]; then",
        '  echo "preempted: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $status",
        "",
    ]
    return "\n".join(lines)


def _placement(config: Config) -> dict[str, object]:
    """Where a job of this config may run: the #SBATCH options the config sets."""
    slurm = config.launch.slurm
    options = {"partition": slurm.partition, "account": slurm.account, "cpus-per-task": slurm.cpus_per_task}
    return {option: value for option, value in options.items() if value is not None}


def _extra_lines(config: Config) -> list[str]:
    return [_sbatch_line(*extra[2:].split("=", 1)) for extra in config.launch.slurm.extra_sbatch]


def render_preparation(config: Config, config_path: Path | None, overrides: list[str], workdir: Path,
                       log_dir: Path, tasks: int | None, after: str | None = None) -> SbatchScript:
    """The sbatch script of one step of a data preparation on SLURM: the partitions, as a job array of `tasks`
    tasks (each claims partitions until none is left), or (tasks None) the manifest, once the array `after` has
    succeeded. The tokenizer is made before either is submitted."""
    return SbatchScript(functools.partial(_preparation_script, config, config_path, overrides, workdir, log_dir, tasks,
                                          after))


def _preparation_script(config: Config, config_path: Path | None, overrides: list[str], workdir: Path, log_dir: Path,
                        tasks: int | None, after: str | None, shown: Callable[[str], str]) -> str:
    options = {"job-name": f"prepare-{config.name}", "nodes": 1, "ntasks": 1, "time": config.launch.slurm.time,
               "output": (workdir / log_dir / ("%A_%a.out" if tasks else "%j.out")).resolve(),
               "chdir": workdir.resolve()}
    if tasks:
        options["array"] = f"0-{tasks - 1}"
    if after:
        options["dependency"] = f"afterok:{after}"
        options["kill-on-invalid-dep"] = "yes"  # a failed task cancels the manifest step rather than strand it
    options.update(_placement(config))
    lines = ["#!/bin/bash"] + [_sbatch_line(option, value) for option, value in options.items()]
    lines += _extra_lines(config)
    arguments = (["--config", str(config_path.resolve())] if config_path else []) + list(overrides)
    step = ["--step", "partitions"] if tasks else ["--step", "manifest"]
    command = " ".join(shlex.quote(shown(part)) for part in [sys.executable, "-m", "launch.prepare_jobs", *arguments,
                                                              *step])
    environment = config.launch.environment.items()
    lines += ["", "set -u", *(f"export {name}={shlex.quote(shown(value))}" for name, value in environment),
              f"exec {command}" + (' --task "$SLURM_ARRAY_TASK_ID"' if tasks else ""), ""]
    return "\n".join(lines)


def submit(script: SbatchScript, directory: Path) -> tuple[str, Path]:
    """Submit the script, and keep it (redacted) in `directory`; returns (job id, kept script's path)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--backend slurm: sbatch is not on PATH; run this on a SLURM login node, or use --dry-run")
    directory.mkdir(parents=True, exist_ok=True)
    path = write_atomically(directory / "submit.sbatch", str(script))
    result = subprocess.run([sbatch, "--parsable"], input=script.runnable, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"--backend slurm: sbatch refused the job: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    path.rename(directory / f"job-{job_id}.sbatch")
    return job_id, directory / f"job-{job_id}.sbatch"


def log_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "slurm" / f"{job_id}.out"
