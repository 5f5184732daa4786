"""Faults a week-long run meets: a rank that dies, a kill mid-save, preemption signals, non-finite steps."""

import json
import math
import os
import re
import signal
import time

import pytest

from pretrain.checkpoint import consolidated_state_dict
from data_pipeline.errors import REQUEUE_EXIT_CODE
from pretrain.metrics import read_metrics
from tests.helpers import (
    job_processes,
    launch,
    rank_pid,
    run_module,
    signal_job,
    start_launch,
    wait_for,
)
from tests.helpers import losses_by_step


def marker(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "complete").read_text())


def test_a_rank_killed_mid_run_ends_the_job_quickly_and_resuming_gives_the_uninterrupted_losses(tiny_config, tmp_path):
    changes = {"train": {"max_steps": 20, "checkpoint_every": 4}}
    launch(tiny_config({**changes, "name": "uninterrupted"}, name="uninterrupted.yaml"))
    uninterrupted = losses_by_step(tmp_path / "runs" / "uninterrupted")

    config = tiny_config({**changes, "name": "killed"}, name="killed.yaml")
    run_dir = tmp_path / "runs" / "killed"
    job = start_launch(config)
    wait_for(run_dir / "checkpoints" / "step_00000004" / "complete", job)
    os.kill(rank_pid(job, rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    assert job.wait(timeout=120) != 0
    assert time.monotonic() - killed_at < 120
    assert job_processes(job) == [job.pid], "processes of the job outlived it"
    assert max(losses_by_step(run_dir)) < 20

    result = launch(config)
    resumed_step = int(re.search(r"resumed from step_\d+ \(step (\d+)\)", result.stdout).group(1))
    assert resumed_step >= 4
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(resumed_step + 1, 21)] == [uninterrupted[s] for s in range(resumed_step + 1, 21)]


def test_a_job_killed_while_saving_resumes_from_the_previous_checkpoint(tiny_config, tmp_path):
    # Wide enough that writing a checkpoint takes a while, so the kill lands inside the save.
    config = tiny_config({"model": {"d_model": 256, "n_layer": 4}, "train": {"max_steps": 12, "checkpoint_every": 4}})
    run_dir = tmp_path / "runs" / "tiny"
    saving = run_dir / "checkpoints" / "step_00000008"
    job = start_launch(config)
    wait_for(saving, job, poll=0.001)
    signal_job(job, signal.SIGKILL)
    job.wait(timeout=60)
    assert not (saving / "complete").exists(), "the save finished before the kill; the test did not kill mid-save"

    result = launch(config)
    assert "resumed from step_00000004 (step 4)" in result.stdout
    assert sorted(losses_by_step(run_dir)) == list(range(1, 13))


@pytest.mark.parametrize(("stop_signal", "to_every_process"), [(signal.SIGTERM, True), (signal.SIGUSR1, False)])
def test_a_preemption_signal_saves_a_checkpoint_at_that_step_and_asks_for_a_requeue(
        tiny_config, tmp_path, stop_signal, to_every_process):
    config = tiny_config({"train": {"max_steps": 1000, "checkpoint_every": 4}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    wait_for(run_dir / "checkpoints" / "step_00000004" / "complete", job)
    if to_every_process:  # as SLURM signals every process of a job
        signal_job(job, stop_signal)
    else:  # as `kill` of the launcher alone
        os.kill(job.pid, stop_signal)
    assert job.wait(timeout=120) == REQUEUE_EXIT_CODE

    last_step = max(losses_by_step(run_dir))
    assert 4 < last_step < 1000
    assert marker(run_dir, last_step) == {
        "step": last_step, "world_size": 2, "zero_stage": 2, "preempted_by": stop_signal.name}
    result = launch(config, "train.max_steps=" + str(last_step + 2))
    assert f"resumed from step_{last_step:08d} (step {last_step})" in result.stdout


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_steps_are_skipped_and_counted_and_too_many_in_a_row_stop_the_run(tiny_config, tmp_path, stage):
    config = tiny_config({
        "train": {"max_steps": 12, "checkpoint_every": 1},
        "deepspeed": {"zero_stage": stage},
        "faults": {"nan_loss_at_steps": [3, 6, 7, 8], "max_consecutive_skipped_steps": 3},
        "eval": {"interval": 0},
    })
    result = run_module("launch", "run", "--config", str(config), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"

    assert result.returncode == 1
    stop = re.search(r"stopped: (.*)", result.stdout + result.stderr).group(1)
    assert stop.startswith("steps 6-8: 3 steps in a row had a non-finite loss or gradient")
    assert str(run_dir / "checkpoints" / "step_00000007") in stop
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(records) == list(range(1, 9))
    assert math.isnan(records[3]["train/loss"]) and math.isfinite(records[4]["train/loss"])
    assert [records[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert not (run_dir / "checkpoints" / "step_00000008").exists()

    # A skipped step leaves the weights as they were.
    weights = {step: consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}") for step in (2, 3, 4)}
    assert all(weights[2][name].equal(weights[3][name]) for name in weights[2])
    assert not all(weights[3][name].equal(weights[4][name]) for name in weights[3])
