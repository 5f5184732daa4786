"""Where a run's numbers go: `metrics.jsonl` in the run directory always, and W&B on rank 0.

One W&B run per training run: its id is made from the run directory's name when the run starts and kept in
the directory (`wandb_run_id`), so every resume or requeue continues the same W&B run. W&B runs offline when
no API key is configured, so a run on a machine with no network still records everything; the end of the run
prints the `wandb sync` command that uploads it (`make sync` uploads every offline run under a directory).

Metrics are named by namespace (`train/`, `val/`, `perf/`, `eval/fewshot/<task>/k=<k>`, `system/`) and every
one of them can be plotted against `train/tokens` as well as the step. Alerts (`wandb.alert`, and a line on the
console) say when the loss goes non-finite, when no step has completed for `logging.stall_alert_minutes`, and
when the run finishes, is preempted or fails.
"""

from __future__ import annotations

import argparse
import json
import math
import netrc
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config
from pretrain.faults import Preempted

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
NAMESPACES = ("train", "val", "perf", "eval", "system")
GIB = 2**30
# W&B writes its offline record in batches; a job killed outright (a node lost) loses what was not written
# yet. Every 2 s bounds that loss at a cost nobody sees (metrics.jsonl is written at every step regardless).
WANDB_FLUSH_SECONDS = 2.0


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


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id, made on first use: its name (in the characters W&B ids allow) and a random
    suffix, so a new run in a directory of the same name never continues an old W&B run."""
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.exists():
        stem = re.sub(r"[^a-z0-9]+", "-", run_dir.resolve().name.lower()).strip("-")[:48] or "run"
        id_file.write_text(f"{stem}-{secrets.token_hex(4)}\n")
    return id_file.read_text().strip()


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def launch_details(run_dir: Path, world_size: int, device: torch.device) -> dict[str, Any]:
    """How this run was started, for the W&B config: the launch backend (from the newest record `python -m
    launch` wrote in the run directory), the nodes and ranks, and the versions that decide its numbers."""
    records = sorted((run_dir / "launches").glob("*.json"))
    submitted = [json.loads(path.read_text()) for path in records]
    # `launch node` records are written on each node by a SLURM or hostfile job; the submission says which.
    submission = next((record for record in reversed(submitted) if record["backend"] != "node"), None)
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return {
        "backend": submission["backend"] if submission else "torchrun",
        "record": records[-1].name if records else None,
        "hosts": submission["hosts"] if submission else [platform.node()],
        "nodes": max(1, world_size // ranks_per_node),
        "ranks_per_node": ranks_per_node,
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **{name: _package_version(name) for name in ("deepspeed", "wandb", "webdataset", "tokenizers")},
        },
    }


def system_metrics(device: torch.device) -> dict[str, float]:
    """Memory (and GPU utilisation where NVML answers) of this process and its device, under `system/`."""
    import psutil  # a DeepSpeed dependency

    values = {"system/cpu_memory_rss_gib": psutil.Process().memory_info().rss / GIB}
    if device.type == "cuda":
        values["system/gpu_memory_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        values["system/gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        values["system/gpu_memory_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
        try:
            values["system/gpu_utilization_percent"] = float(torch.cuda.utilization(device))
        except (ModuleNotFoundError, RuntimeError):
            pass  # no NVML bindings here: the memory figures still stand
    return values


def wandb_command() -> str:
    beside_python = Path(sys.executable).with_name("wandb")
    return str(beside_python) if beside_python.exists() else "wandb"


class RunLogger:
    """Records one dict of metrics per step and raises alerts. Only rank 0 writes; elsewhere every call is a
    no-op. Used as a context manager, it closes the W&B run with an alert saying how the run ended."""

    def __init__(self, config: Config, is_main: bool, resumed_from_step: int | None, launch: dict | None = None):
        self.enabled = is_main
        self.wandb_run = None
        if not self.enabled:
            return
        self.config = config
        run_dir = config.run_dir
        path = run_dir / METRICS_FILE
        earlier = read_metrics(run_dir)
        # The highest step an earlier attempt sent to W&B (each step reaches the file first). Steps up to it
        # that a resumed run repeats are not sent again, so W&B's history has no step twice or out of order.
        self.sent_through = max((record["step"] for record in earlier), default=-1)
        if resumed_from_step is not None:
            # Steps after the checkpoint were thrown away with the crash; the resumed run logs them anew.
            kept = [record for record in earlier if record["step"] <= resumed_from_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = path.open("a")
        self.last: dict[str, Any] = {}
        self.mode = wandb_mode(config.logging.wandb_mode)
        if self.mode != "disabled":
            self.wandb_run = self._start_wandb(config, launch or {})
        self.last_progress = time.monotonic()
        self.stalled = False
        self.stop_watching = threading.Event()
        if config.logging.stall_alert_minutes:
            threading.Thread(target=self._watch_for_stalls, name="stall-watch", daemon=True).start()

    def _start_wandb(self, config: Config, launch: dict):
        import wandb  # deferred: a run with W&B disabled does not need it installed

        logging = config.logging
        run = wandb.init(
            entity=logging.wandb_entity,
            project=logging.wandb_project,
            group=logging.wandb_group,
            job_type=logging.wandb_job_type,
            tags=logging.wandb_tags,
            name=config.name,
            id=wandb_run_id(config.run_dir),
            resume="allow",  # a resumed training run continues the same W&B run
            dir=str(config.run_dir),
            config={**config.model_dump(mode="json"), "launched": launch},
            allow_val_change=True,  # a resumed run may have changed a setting, max_steps say
            mode=self.mode,
            settings=wandb.Settings(console="off", quiet=True, x_transaction_log_flush_interval=WANDB_FLUSH_SECONDS),
        )
        run.define_metric("train/tokens")
        for namespace in NAMESPACES:
            run.define_metric(f"{namespace}/*", step_metric="train/tokens")
        return run

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        self.last.update(record)
        self.last_progress = time.monotonic()
        self.stalled = False
        if self.wandb_run is not None and step > self.sent_through:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and math.isfinite(v)}, step=step)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """A line on the console and, where W&B runs, a W&B alert (mailed or posted to Slack when online)."""
        if not self.enabled:
            return
        print(f"{level.lower()}: {title}: {text}", file=sys.stderr if level != "INFO" else sys.stdout, flush=True)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.alert(title=f"{self.config.name}: {title}", text=text,
                                 level=getattr(wandb.AlertLevel, level), wait_duration=0)

    def _watch_for_stalls(self) -> None:
        limit = self.config.logging.stall_alert_minutes * 60
        while not self.stop_watching.wait(min(limit / 4, 30.0)):
            idle = time.monotonic() - self.last_progress
            if idle > limit and not self.stalled:
                self.stalled = True
                where = f"after step {self.last['step']}" if self.last else "before the first step"
                self.alert("no progress", f"no step has completed for {idle / 60:.1f} minutes ({where}); the job may be"
                           " hung: check every rank's log (logging.stall_alert_minutes sets this limit)")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, error_type, error, _traceback) -> None:
        if not self.enabled:
            return
        step = self.last.get("step")
        if error is None:
            validation = f", val/loss {self.last['val/loss']:.4f}" if "val/loss" in self.last else ""
            self.alert("finished", f"reached step {step}{validation}", level="INFO")
        elif isinstance(error, Preempted):
            self.alert("preempted", f"stopped at step {step} to be requeued: {error}", level="INFO")
        else:
            self.alert("failed", f"{error_type.__name__} after step {step}: {error}", level="ERROR")
        self.close(exit_code=0 if error is None or isinstance(error, Preempted) else 1)

    def close(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self.stop_watching.set()
        self.file.close()
        if self.wandb_run is None:
            return
        run_id = self.wandb_run.id
        self.wandb_run.finish(exit_code=exit_code)
        if self.mode == "offline":
            attempts = sorted(str(path) for path in (self.config.run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
            print(f"W&B ran offline; upload this run with: {shlex.join([wandb_command(), 'sync', *attempts])}"
                  " (or `make sync` for every run under a directory)", flush=True)


def offline_runs_to_sync(directory: Path) -> list[Path]:
    """Every offline W&B run directory under `directory` not uploaded yet, each run's attempts in the order they
    ran (their names start with the time), so a resumed run is uploaded as one run in step order."""
    found = sorted(directory.rglob("wandb/offline-run-*"), key=lambda path: (path.parent, path.name))
    # `wandb sync` leaves <run file>.synced beside a run it has uploaded.
    return [path for path in found if path.is_dir() and not any(path.glob("*.wandb.synced"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.metrics", description="W&B housekeeping for runs")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="upload every offline W&B run under a directory (make sync)")
    sync.add_argument("directory", type=Path, nargs="?", default=Path("runs"))
    sync.add_argument("--dry-run", action="store_true", help="print the wandb command instead of running it")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory}: no such directory; pass the directory that holds the runs", file=sys.stderr)
        return 1
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
    sys.exit(main())
