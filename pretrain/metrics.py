"""Where a run's numbers go: `metrics.jsonl` in the run directory always, and W&B on rank 0.

W&B runs offline when no API key is configured, so a run on a machine with no network still records
everything; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from pretrain.config import Config

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None  # where `wandb login` stores it
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "online" if _wandb_api_key_configured() else "offline"


class RunLogger:
    """Records one dict of metrics per step. Only rank 0 writes; on the other ranks every call is a no-op."""

    def __init__(self, config: Config, is_main: bool, resumed_from_step: int | None):
        self.enabled = is_main
        self.wandb_run = None
        if not self.enabled:
            return
        run_dir = config.run_dir
        path = run_dir / METRICS_FILE
        if resumed_from_step is not None:
            # Steps after the checkpoint were thrown away with the crash; the resumed run logs them anew.
            kept = [record for record in read_metrics(run_dir) if record["step"] <= resumed_from_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = path.open("a")
        mode = wandb_mode(config.logging.wandb_mode)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(config, mode)

    @staticmethod
    def _start_wandb(config: Config, mode: str):
        import wandb  # deferred: a run with W&B disabled does not need it installed

        id_file = config.run_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8) + "\n")
        return wandb.init(
            project=config.logging.wandb_project,
            name=config.name,
            id=id_file.read_text().strip(),
            resume="allow",  # a resumed training run continues the same W&B run
            dir=str(config.run_dir),
            config=config.model_dump(mode="json"),
            mode=mode,
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and math.isfinite(v)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
