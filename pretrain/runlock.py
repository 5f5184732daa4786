"""One job per run directory. Two jobs training one run (a resubmitted sbatch, `make train` typed twice) would
delete each other's checkpoints and interleave metrics.jsonl, so rank 0 holds a lock on the run directory for the
whole run and a second job is refused, told who holds it.

The lock is a POSIX record lock (fcntl.lockf) on `running.lock`: the kernel releases it when the holder dies,
however it dies, so a crashed job never leaves a run locked; NFS servers with lock support honour it across
hosts. The file's content names the holder (host, pid, SLURM job), for the refusal to quote; it is only
rewritten in place, never replaced, since the lock belongs to the file's inode.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import UserError

LOCK_FILE = "running.lock"


class RunInUse(UserError):
    """Another job is training this run; the message names it."""


def describe_holder(content: str) -> str:
    try:
        holder = json.loads(content)
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"host {holder['host']}, pid {holder['pid']}{job}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a job that has not yet written its name"


def _lock_or_refuse(descriptor: int, run_dir: Path) -> None:
    """Lock the open lock file, or close it and raise RunInUse naming the job that holds it."""
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 4096, 0).decode(errors="replace")
        os.close(descriptor)
        raise RunInUse(
            f"{run_dir}: another job is training this run ({describe_holder(holder)}); wait for it to end or"
            " stop it (scancel, Ctrl-C), or give this run another name"
        ) from None


@dataclass
class RunLock:
    """Held by rank 0 from start-up to exit; an inert one (`descriptor` None) on the other ranks."""

    path: Path
    descriptor: int | None = None

    @classmethod
    def take(cls, run_dir: Path, holds: bool = True) -> RunLock:
        """Lock `run_dir` for this process (if `holds`), or raise RunInUse naming the job that has it."""
        path = Path(run_dir) / LOCK_FILE
        if not holds:
            return cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        _lock_or_refuse(descriptor, run_dir)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(descriptor)
        return cls(path, descriptor)

    @staticmethod
    def refuse_if_held(run_dir: Path) -> None:
        """Raise RunInUse if a job holds `run_dir` now; create nothing (a launcher checks before any work)."""
        try:
            descriptor = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return  # never trained here
        _lock_or_refuse(descriptor, run_dir)
        os.close(descriptor)  # free: released at once

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing the file releases the lock
            self.descriptor = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_exception) -> None:
        self.release()
