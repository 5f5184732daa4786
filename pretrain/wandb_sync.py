"""Upload every offline W&B run under a directory, each resumed run's attempts in the order they ran:

    python -m pretrain.wandb_sync [RUNS_DIR] [--dry-run]        (or: make sync)
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser, run_command
from data_pipeline.common.errors import UserError
from data_pipeline.common.wandb_runs import wandb_command


def offline_runs_to_sync(directory: Path) -> list[Path]:
    """Every offline W&B run directory under `directory` not uploaded yet, each run's attempts in the order they
    ran (their names start with the time), so a resumed run is uploaded as one run in step order."""
    found = sorted(directory.rglob("wandb/offline-run-*"), key=lambda path: (path.parent, path.name))
    # `wandb sync` leaves <run file>.synced beside a run it has uploaded.
    return [path for path in found if path.is_dir() and not any(path.glob("*.wandb.synced"))]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pretrain.wandb_sync", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("runs"))
    parser.add_argument("--dry-run", action="store_true", help="print the wandb command instead of running it")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        raise UserError(f"{args.directory}: no such directory; pass the directory that holds the runs")
    pending = offline_runs_to_sync(args.directory)
    if not pending:
        print(f"nothing to sync: no offline W&B run under {args.directory} that is not uploaded already")
        return 0
    command = [wandb_command(), "sync", *map(str, pending)]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    run_command(main)
