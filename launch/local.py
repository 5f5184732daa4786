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

from data_pipeline.common.errors import REQUEUE_EXIT_CODE
from pretrain.checkpoint_store import newest_complete, read_marker
from pretrain.faults import PREEMPTION_SIGNALS

DEFAULT_CPU_RANKS = 2


def gpus_here() -> int:
    import torch  # deferred: the launcher itself never needs torch, only this count of GPUs

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


# How often the ranks are told again after a stop signal: a rank told while still starting (before its handler is
# installed, when the signal is ignored) hears it the next time.
RETELL_SECONDS = 2.0
# torchrun acts on SIGTERM and SIGINT by itself (the ranks terminated, then killed 30 s later whatever a save needs);
# told to handle neither (its --signals-to-handle option, read from PET_SIGNALS_TO_HANDLE; older versions read the
# other name), it leaves the decision to the launcher.
TORCHRUN_HANDLES_NO_STOP_SIGNAL = {name: "SIGHUP,SIGQUIT"
                                   for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
STOPPED_AT_ONCE_EXIT_CODE = 130  # as a shell reports a command ended by Ctrl-C


def _leave_stop_signals_to_the_launcher() -> None:
    # Ignored in torchrun, and inherited by its ranks until they install their own handler (SIGINT stays ignored
    # there: the launcher tells them with SIGTERM). A signal SLURM sends every process of the job then reaches
    # the ranks' handler, and torchrun goes on supervising them.
    for stop_signal in (*PREEMPTION_SIGNALS, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def _ranks_of(torchrun: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(torchrun.pid).children()
    except psutil.NoSuchProcess:
        return []


def _signal_each(processes: list[psutil.Process], signal_number: int) -> None:
    for process in processes:
        try:
            process.send_signal(signal_number)
        except psutil.NoSuchProcess:
            pass


def run_node(command: list[str], environment: dict[str, str], ranks_per_node: int, run_dir: Path) -> int:
    """Run torchrun to completion, deciding alone what a stop signal does. SIGTERM, SIGUSR1 or a first Ctrl-C:
    the ranks are told (with that signal; SIGTERM for a Ctrl-C), finish their step, save a checkpoint and exit,
    or exit at once before their first step; the return code is then REQUEUE_EXIT_CODE, as it is when the ranks
    stopped on a signal of their own. A second Ctrl-C stops everything at once."""
    environment = {**os.environ, **environment, **TORCHRUN_HANDLES_NO_STOP_SIGNAL}
    # Share the cores between CPU ranks rather than oversubscribing them (torchrun would pin each to 1).
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
    started = time.time()
    received: list[int] = []

    def record(signal_number: int, _frame) -> None:
        received.append(signal_number)

    # Installed before torchrun starts, so that no stop signal can kill this process and leave the ranks running.
    for stop_signal in (*PREEMPTION_SIGNALS, signal.SIGINT):
        signal.signal(stop_signal, record)
    # A session of its own: a Ctrl-C at the terminal reaches this process alone, not torchrun beside it.
    torchrun = subprocess.Popen(command, env=environment, preexec_fn=_leave_stop_signals_to_the_launcher,
                                start_new_session=True)
    told_at = None
    while (returncode := _wait(torchrun, seconds=0.5)) is None:
        if received.count(signal.SIGINT) >= 2:
            ranks = _ranks_of(torchrun)
            torchrun.kill()
            _signal_each(ranks, signal.SIGKILL)
        elif received and (told_at is None or time.monotonic() - told_at >= RETELL_SECONDS):
            ranks = _ranks_of(torchrun)
            if not ranks and told_at is not None:
                torchrun.kill()  # still no rank to tell (it waits for other nodes): nothing a save could keep
            # What the launcher heard (a Ctrl-C as SIGTERM: the ranks ignore SIGINT), so their checkpoint names it.
            _signal_each(ranks, signal.SIGTERM if received[0] == signal.SIGINT else received[0])
            told_at = time.monotonic()
    return _outcome(returncode, received, run_dir, started)


def _wait(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _outcome(returncode: int, received: list[int], run_dir: Path, started: float) -> int:
    """The launcher's exit code, saying how the ranks ended and what a signal made of it."""
    if received.count(signal.SIGINT) >= 2:
        print("stopped at once by a second Ctrl-C; train.resume=auto continues from the newest checkpoint", flush=True)
        return STOPPED_AT_ONCE_EXIT_CODE
    newest = newest_complete(run_dir)
    if returncode != 0 and newest is not None and newest.stat().st_mtime >= started:
        marker = read_marker(newest)
        if "preempted_by" in marker:
            print(f"preempted ({marker['preempted_by']}): saved {newest} at step {marker['step']}; exit code"
                  f" {REQUEUE_EXIT_CODE} asks for a requeue, and train.resume=auto continues from it", flush=True)
            return REQUEUE_EXIT_CODE
    if returncode != 0 and received:
        print(f"stopped by {signal.Signals(received[0]).name} before training started; exit code"
              f" {REQUEUE_EXIT_CODE} asks for a requeue", flush=True)
        return REQUEUE_EXIT_CODE
    return returncode
