"""The one module that talks to W&B: start a run with the project's settings, finish it (saying how to upload it
when it ran offline), and the tables, images and alerts the packages log into it, so no other module imports
wandb. W&B runs offline when no API key is configured (mode `auto`), so a run on a machine with no network still
records everything; `wandb sync` uploads it later (`python -m pretrain.wandb_sync`, `make sync`).
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from data_pipeline.common.errors import UserError
from data_pipeline.common.files import write_atomically

WANDB_ID_FILE = "wandb_run_id"
# W&B writes its offline record in batches; a job killed outright (a node lost) loses what was not written
# yet. Every 2 s bounds that loss at a cost nobody sees (metrics.jsonl is written at every step regardless).
WANDB_FLUSH_SECONDS = 2.0


class WandbError(UserError):
    """W&B refused to start a run (a bad key, no network in online mode); the message says what to do."""


def _wandb() -> ModuleType:
    import wandb  # deferred: seconds to import, and a command with W&B disabled does not need it

    return wandb


def table(columns: list[str], rows: list[list[Any]]) -> Any:
    """A W&B table, to log under a key."""
    return _wandb().Table(columns=columns, data=rows)


def image(path: Path) -> Any:
    """An image file (a plot), to log under a key."""
    return _wandb().Image(str(path))


def line_series(xs: list[float], ys: list[list[float]], keys: list[str], title: str, xname: str) -> Any:
    """A W&B chart of several lines over one x axis, to log under a key."""
    return _wandb().plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname=xname)


def alert(run: Any, title: str, text: str, level: str) -> None:
    """A W&B alert (mailed or posted to Slack when online); `level` is INFO, WARN or ERROR."""
    run.alert(title=title, text=text, level=getattr(_wandb().AlertLevel, level), wait_duration=0)


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
    wandb = _wandb()
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
