"""Start a run on this machine: one rank per GPU, or CPU ranks over gloo where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_CPU_RANKS = 2


def default_ranks() -> int:
    import torch

    return torch.cuda.device_count() or DEFAULT_CPU_RANKS


def torchrun_command(ranks: int, config_path: str | None, overrides: list[str]) -> list[str]:
    """The command that starts `ranks` training processes here, as an argument list (no shell involved)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", "pretrain.train"]
    if config_path is not None:
        command += ["--config", config_path]
    return command + list(overrides)


def run_local(ranks: int, config_path: str | None, overrides: list[str], extra_environment: dict[str, str]) -> int:
    environment = {**os.environ, **extra_environment}
    # Share the cores between CPU ranks rather than oversubscribing them (torchrun would pin each to 1).
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return subprocess.call(torchrun_command(ranks, config_path, overrides), env=environment)
