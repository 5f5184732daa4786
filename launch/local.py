"""Run the ranks of one node under torchrun, and supervise them: this module is what every backend ends in.

`local` runs it for this machine alone; `hostfile` on each host with a c10d rendezvous on the first; `slurm`
once per node from the sbatch script (`python -m launch node`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from data_pipeline.errors import REQUEUE_EXIT_CODE
from pretrain.checkpoint import newest_complete, read_marker
from pretrain.faults import PREEMPTION_SIGNALS

DEFAULT_CPU_RANKS = 2


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node run meet (torchrun's c10d rendezvous, hosted by the first node)."""

    nodes: int
    endpoint: str  # host:port
    run_id: str


def torchrun_command(ranks_per_node: int, config_path: str | None, overrides: list[str],
                     rendezvous: Rendezvous | None = None) -> list[str]:
    """The command that starts this node's ranks, as an argument list (no shell involved)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks_per_node}"]
    if rendezvous is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={rendezvous.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rendezvous.endpoint}",
                    f"--rdzv_id={rendezvous.run_id}"]
    command += ["-m", "pretrain.train"]
    if config_path is not None:
        command += ["--config", config_path]
    return command + list(overrides)


def _ignore_preemption_warning() -> None:
    # torchrun would die of SIGUSR1 (it does not handle it) and leave its ranks unsupervised; ignoring it is
    # inherited, and the ranks install their own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_node(command: list[str], environment: dict[str, str], ranks_per_node: int, run_dir: Path) -> int:
    """Run torchrun to completion. A stop signal to this process reaches the ranks, which save a checkpoint;
    the return code is then REQUEUE_EXIT_CODE, as it is when the ranks stopped on a signal of their own."""
    environment = {**os.environ, **environment}
    # Share the cores between CPU ranks rather than oversubscribing them (torchrun would pin each to 1).
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
    started = time.time()
    torchrun: subprocess.Popen | None = None
    stopped_before_ranks = []

    def forward_to_ranks(signal_number: int, _frame) -> None:
        if torchrun is None:  # before torchrun exists: it is stopped as soon as it does
            stopped_before_ranks.append(signal_number)
            return
        # The ranks run in sessions of their own, so a signal to this process group does not reach them.
        try:
            ranks = psutil.Process(torchrun.pid).children()
        except psutil.NoSuchProcess:
            ranks = []
        for rank in ranks:
            try:
                rank.send_signal(signal.SIGTERM if signal_number == signal.SIGINT else signal_number)
            except psutil.NoSuchProcess:
                pass
        if not ranks:  # none started yet: nothing to save, and nothing would hear the signal
            stopped_before_ranks.append(signal_number)
            torchrun.terminate()

    # Installed before torchrun starts, so that no stop signal can kill this process and leave the ranks running.
    for stop_signal in (*PREEMPTION_SIGNALS, signal.SIGINT):
        signal.signal(stop_signal, forward_to_ranks)
    torchrun = subprocess.Popen(command, env=environment, preexec_fn=_ignore_preemption_warning)
    if stopped_before_ranks:
        torchrun.terminate()
    returncode = torchrun.wait()
    if returncode != 0 and stopped_before_ranks:
        print(f"stopped by a signal before training started; exit code {REQUEUE_EXIT_CODE} asks for a requeue",
              flush=True)
        return REQUEUE_EXIT_CODE
    newest = newest_complete(run_dir)
    if returncode != 0 and newest is not None and newest.stat().st_mtime >= started:
        marker = read_marker(newest)
        if "preempted_by" in marker:
            print(f"preempted ({marker['preempted_by']}): saved {newest} at step {marker['step']}; exit code"
                  f" {REQUEUE_EXIT_CODE} asks for a requeue, and train.resume=auto continues from it", flush=True)
            return REQUEUE_EXIT_CODE
    return returncode
