"""A watched run shared by the W&B and report tests: the slow part (two real launches) runs once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pretrain.config import merged
from pretrain.rundir.reader import METRICS_FILE, read_metrics
from tests.helpers import (
    PLANTED_SECRET,
    SECRET_VARIABLE,
    TINY_CONFIG,
    WATCHED_STEPS,
    launch,
    of_type,
    rank_pid,
    signal_job,
    start_launch,
    wait_for,
    wandb_records,
)


@dataclass
class WatchedRun:
    run_dir: Path
    killed_after: int  # the highest step in metrics.jsonl when the job was killed
    resumed: subprocess.CompletedProcess  # the second launch, which resumed and finished
    attempts: list[Path]  # the offline W&B directories, oldest first
    records: list[list[dict]]  # each attempt's W&B records


def highest_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl among its whole lines (the last may be half written)."""
    lines = (run_dir / METRICS_FILE).read_text().split("\n")[:-1]
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


@pytest.fixture(scope="session")
def watched_run(tmp_path_factory) -> WatchedRun:
    """A 2-rank run with offline W&B, a NaN-loss drill at step 3 and few-shot evaluations in the loop, killed
    (SIGKILL to every process, as when a node dies) a few steps after a checkpoint, then launched again: it
    resumes and finishes."""
    root = tmp_path_factory.mktemp("watched")
    config = merged(TINY_CONFIG, {
        "name": "watched",
        "output_dir": str(root / "runs"),
        "train": {"max_steps": WATCHED_STEPS, "checkpoint_every": 10},
        "eval": {"interval": 10, "fewshot": {"tasks": ["word_labels"], "shots": [0, 1, 4], "items": 20,
                                             "interval": 25}},
        "faults": {"nan_loss_at_steps": [3]},
        "logging": {"wandb_mode": "offline", "wandb_tags": ["tiny", "ci"], "wandb_job_type": "pretrain",
                    "wandb_group": "test-sweep", "print_every": 5},
    })
    config["data"]["dir"] = str(root / "data")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = root / "runs" / "watched"

    # A secret exported where the run is launched from, as docs/training.md says to give one: no file may hold it.
    os.environ[SECRET_VARIABLE] = PLANTED_SECRET
    job = start_launch(config_path)
    wait_for(run_dir / "checkpoints" / "step_00000010" / "complete", job)
    (attempt,) = (run_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 120
    # Until W&B's offline record holds steps past the checkpoint, which the resumed run will repeat. Each step
    # reaches metrics.jsonl first; W&B commits a step's row when the next step is logged, so step 13 there means
    # step 12 in W&B. Then rank 1 is paused, which holds rank 0 in its next collective: the run cannot finish
    # however far W&B's offline record lags behind under load, while rank 0's W&B threads go on writing it.
    while highest_step(run_dir) <= 12:
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.1)
    os.kill(rank_pid(job, rank=1), signal.SIGSTOP)
    while max((h["step"]["num"] for h in of_type(wandb_records(attempt), "history")), default=0) <= 11:
        assert job.poll() is None and time.monotonic() < deadline, "W&B's record did not pass the checkpoint"
        time.sleep(0.1)
    signal_job(job, signal.SIGKILL)
    job.wait()
    killed_after = max(record["step"] for record in read_metrics(run_dir))
    assert killed_after < WATCHED_STEPS, "the run finished before the kill"
    try:
        resumed = launch(config_path)
    finally:
        del os.environ[SECRET_VARIABLE]
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    return WatchedRun(run_dir, killed_after, resumed, attempts, [wandb_records(path) for path in attempts])
