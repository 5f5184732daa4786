"""The one way the project talks to W&B: start a run with the project's settings, finish it (saying how to upload
it when it ran offline), and upload every offline run under a directory:

    python -m pretrain.wandb_runs sync [RUNS_DIR] [--dry-run]        (or: make sync)

W&B runs offline when no API key is configured (mode `auto`), so a run on a machine with no network still
records everything; `wandb sync` uploads it later.
"""

from __future__ import annotations

import argparse
import netrc
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from data_pipeline.cli import run_command
from data_pipeline.errors import UserError
from data_pipeline.files import write_atomically

WANDB_ID_FILE = "wandb_run_id"
# W&B writes its offline record in batches; a job killed outright (a node lost) loses what was not written
# yet. Every 2 s bounds that loss at a cost nobody sees (metrics.jsonl is written at every step regardless).
WANDB_FLUSH_SECONDS = 2.0


class WandbError(UserError):
    """W&B refused to start a run (a bad key, no network in online mode); the message says what to do."""


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None  # where `wandb login` stores it
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(setting: str) -> str:
    """`auto` becomes `online` where a W&B API key is configured and `offline` elsewhere; other modes stay."""
    if setting != "auto":
        return setting
    return "online" if _api_key_configured() else "offline"


def run_id_for(run_dir: Path) -> str:
    """The run directory's W&B id, made on first use: its name (in the characters W&B ids allow) and a random
    suffix, so a new run in a directory of the same name never continues an old W&B run."""
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.exists():
        stem = re.sub(r"[^a-z0-9]+", "-", run_dir.resolve().name.lower()).strip("-")[:48] or "run"
        write_atomically(id_file, f"{stem}-{secrets.token_hex(4)}\n")
    return id_file.read_text().strip()


def start_run(*, mode: str, directory: Path, project: str, name: str, job_type: str, config: dict[str, Any],
              entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
              run_id: str | None = None):
    """A W&B run written under `directory`/wandb, or None where `mode` (auto, online, offline, disabled) resolves
    to disabled. With `run_id`, a run of that id is continued (a resumed training run), its config updated."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    import wandb  # deferred: a command with W&B disabled does not need it

    try:
        return wandb.init(
            entity=entity, project=project, group=group, job_type=job_type, tags=tags, name=name, id=run_id,
            resume="allow" if run_id else None, allow_val_change=run_id is not None, dir=str(directory),
            config=config, mode=mode,
            settings=wandb.Settings(console="off", quiet=True, x_transaction_log_flush_interval=WANDB_FLUSH_SECONDS),
        )
    except wandb.Error as error:
        raise WandbError(f"W&B ({mode}): {error}; run it offline (wandb mode offline) and upload it later with"
                         " `make sync`") from None


def wandb_command() -> str:
    beside_python = Path(sys.executable).with_name("wandb")
    return str(beside_python) if beside_python.exists() else "wandb"


def finish_run(run, exit_code: int = 0) -> str | None:
    """Finish `run`; where it ran offline, the line that says how to upload it (every attempt of a resumed run)."""
    offline_dir = Path(run.settings.sync_dir).parent if run.offline else None
    run.finish(exit_code=exit_code)
    if offline_dir is None:
        return None
    attempts = sorted(str(path) for path in offline_dir.glob(f"offline-run-*-{run.id}"))
    return (f"W&B ran offline; upload this run with: {shlex.join([wandb_command(), 'sync', *attempts])}"
            " (or `make sync` for every run under a directory)")


def offline_runs_to_sync(directory: Path) -> list[Path]:
    """Every offline W&B run directory under `directory` not uploaded yet, each run's attempts in the order they
    ran (their names start with the time), so a resumed run is uploaded as one run in step order."""
    found = sorted(directory.rglob("wandb/offline-run-*"), key=lambda path: (path.parent, path.name))
    # `wandb sync` leaves <run file>.synced beside a run it has uploaded.
    return [path for path in found if path.is_dir() and not any(path.glob("*.wandb.synced"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.wandb_runs", description="W&B housekeeping for runs")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="upload every offline W&B run under a directory (make sync)")
    sync.add_argument("directory", type=Path, nargs="?", default=Path("runs"))
    sync.add_argument("--dry-run", action="store_true", help="print the wandb command instead of running it")
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
