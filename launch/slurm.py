"""SLURM: render an sbatch script for a run, and submit it.

The script asks SLURM to send SIGUSR1 to every process of the job `preemption_warning_seconds` before its time
limit; the ranks checkpoint and exit with REQUEUE_EXIT_CODE, and the script requeues the job, which resumes
with train.resume=auto. Every value that reaches the script is quoted for the shell (or refused where it
would sit on an #SBATCH line), so no config value can run as shell code.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pretrain.config import Config, ConfigError
from pretrain.faults import REQUEUE_EXIT_CODE


def _sbatch_line(option: str, value: object | None = None) -> str:
    """`#SBATCH --option=value` (or a bare `--option`). sbatch reads these lines, the shell skips them as
    comments; a newline would end one and start a shell command, so control characters are refused."""
    line = f"#SBATCH --{option}" + ("" if value is None else f"={value}")
    if re.search(r"[\x00-\x1f\x7f]", line):
        raise ConfigError(f"launch.slurm: {line!r} holds a control character (a newline?); remove it")
    return line


def render_sbatch(config: Config, config_path: Path | None, overrides: list[str], nodes: int, gpus_per_node: int,
                  ranks_per_node: int, workdir: Path) -> str:
    """The sbatch script for this run: SLURM options, then one supervised torchrun per node (mode torchrun) or
    one task per rank (mode tasks)."""
    slurm = config.launch.slurm
    logs = (workdir / config.run_dir / "slurm").resolve()
    tasks_per_node = 1 if slurm.mode == "torchrun" else ranks_per_node
    options = {
        "job-name": slurm.job_name or config.name,
        "nodes": nodes,
        "ntasks-per-node": tasks_per_node,
        "time": slurm.time,
        "output": logs / "%j.out",
        "chdir": workdir.resolve(),
        "signal": f"USR1@{slurm.preemption_warning_seconds}",
    }
    if gpus_per_node:
        options["gpus-per-node"] = gpus_per_node
    for option, value in (("partition", slurm.partition), ("account", slurm.account),
                          ("cpus-per-task", slurm.cpus_per_task)):
        if value is not None:
            options[option] = value
    lines = ["#!/bin/bash"] + [_sbatch_line(option, value) for option, value in options.items()]
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += [_sbatch_line(*extra[2:].split("=", 1)) for extra in slurm.extra_sbatch]

    config_args = ["--config", str(config_path.resolve())] if config_path else []
    train_args = [shlex.quote(arg) for arg in config_args + list(overrides)]
    python = shlex.quote(sys.executable)
    lines += [
        "",
        "set -u",
        *(f"export {name}={shlex.quote(value)}" for name, value in config.launch.environment.items()),
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR MASTER_PORT={config.launch.rendezvous_port}",
        f'echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, {slurm.mode} mode"',
    ]
    if slurm.mode == "torchrun":
        lines.append(
            f"srun --kill-on-bad-exit=1 {python} -m launch node --nodes \"$SLURM_NNODES\""
            f" --ranks-per-node {ranks_per_node} --rendezvous \"$MASTER_ADDR:$MASTER_PORT\""
            f" --rendezvous-id \"$SLURM_JOB_ID\" {' '.join(train_args)}"
        )
    else:
        lines.append(f"srun --kill-on-bad-exit=1 {python} -m pretrain.train {' '.join(train_args)}")
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


def submit(script: str, run_dir: Path) -> tuple[str, Path]:
    """Write the script under the run directory and submit it; returns (job id, script path)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--backend slurm: sbatch is not on PATH; run this on a SLURM login node, or use --dry-run")
    directory = run_dir / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "submit.sbatch"
    path.write_text(script)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"--backend slurm: sbatch refused the job: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    path.rename(directory / f"job-{job_id}.sbatch")
    return job_id, directory / f"job-{job_id}.sbatch"


def log_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "slurm" / f"{job_id}.out"
