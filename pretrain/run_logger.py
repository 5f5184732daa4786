"""Where a run's numbers go: `metrics.jsonl` in the run directory always, and W&B on rank 0.

One W&B run per training run (started by `data_pipeline.common.wandb_runs`, the project's one W&B module): its id is
made from the run directory's name when the run starts and kept in the directory (`wandb_run_id`), so every resume
or requeue continues the same W&B run. W&B runs offline when no API key is configured, so a run on a machine with
no network still records everything; the end of the run prints the `wandb sync` command that uploads it (`make
sync` uploads every offline run under a directory). `pretrain.rundir.reader.read_metrics` reads `metrics.jsonl` back.

Metrics are named by namespace (`train/`, `val/`, `perf/`, `eval/fewshot/<task>/k=<k>`, `system/`) and every
one of them can be plotted against `train/tokens` as well as the step. Alerts (`wandb.alert`, and a line on the
console) say when the loss goes non-finite, when no step has completed for `logging.stall_alert_minutes`, and
when the run finishes, is preempted or fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from data_pipeline.common import wandb_runs
from data_pipeline.common.files import write_atomically
from data_pipeline.common.redaction import redact_text, redacted_tree
from data_pipeline.common.wandb_runs import finish_run, run_id_for, start_run
from pretrain.config import Config
from pretrain.faults import Preempted
from pretrain.rundir.reader import METRICS_FILE, read_metrics

NAMESPACES = ("train", "val", "perf", "eval", "system")


@contextlib.contextmanager
def _command_line_redacted() -> Iterator[None]:
    """W&B keeps the command line of the process that starts a run (sys.argv) with the run's metadata, and an
    override on it may carry a credential (a signed data.shard_url): W&B is shown it redacted."""
    command_line = sys.argv
    sys.argv = [redact_text(argument) for argument in command_line]
    try:
        yield
    finally:
        sys.argv = command_line


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
        if resumed_from_step is not None or path.exists():
            # Steps after the checkpoint were thrown away with the crash (all of them, without one); the run logs
            # them anew. Rewritten whole, which also drops a last line the crash cut short.
            through = -1 if resumed_from_step is None else resumed_from_step
            kept = [record for record in earlier if record["step"] <= through]
            write_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
        self.file = path.open("a")
        self.last: dict[str, Any] = {}
        self.wandb_run = self._start_wandb(config, launch or {})
        self.last_progress = time.monotonic()
        self.stalled = False
        self.stop_watching = threading.Event()
        if config.logging.stall_alert_minutes:
            threading.Thread(target=self._watch_for_stalls, name="stall-watch", daemon=True).start()

    def _start_wandb(self, config: Config, launch: dict):
        logging = config.logging
        with _command_line_redacted():
            run = start_run(
                mode=logging.wandb_mode, directory=config.run_dir, project=logging.wandb_project, name=config.name,
                job_type=logging.wandb_job_type, config={**config.redacted_dump(), "launched": redacted_tree(launch)},
                entity=logging.wandb_entity, group=logging.wandb_group, tags=logging.wandb_tags,
                run_id=run_id_for(config.run_dir),  # a resumed training run continues the same W&B run
            )
        if run is not None:
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
            wandb_runs.alert(self.wandb_run, f"{self.config.name}: {title}", text, level)

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
        finished = finish_run(self.wandb_run, exit_code=exit_code)
        if finished:
            print(finished, flush=True)
