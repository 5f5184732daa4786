"""Stop signals to the launcher, as a user or a scheduler sends them: the launcher alone decides, the ranks finish
their step and save (or, still starting, exit at once), and the run resumes from there."""

import os
import signal
import time
from pathlib import Path

import psutil

import data_pipeline
import pretrain
from data_pipeline.common.errors import REQUEUE_EXIT_CODE
from launch.local import STOPPED_AT_ONCE_EXIT_CODE
from pretrain.checkpoint_store import complete_tags, newest_complete, read_marker
from pretrain.rundir.reader import read_metrics
from tests.helpers import job_processes, launch, losses_by_step, start_launch, wait_for, wait_for_step


def ctrl_c(job) -> None:
    """What a terminal does on Ctrl-C: SIGINT to its foreground process group, which the launcher leads."""
    os.killpg(job.pid, signal.SIGINT)


def test_ctrl_c_mid_run_saves_a_checkpoint_at_that_step_to_resume_from(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 1000, "checkpoint_every": 4}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    wait_for(run_dir / "checkpoints" / "step_00000004" / "complete", job)
    ctrl_c(job)
    assert job.wait(timeout=120) == REQUEUE_EXIT_CODE, job.log.read_text()[-3000:]

    last_step = max(losses_by_step(run_dir))
    newest = newest_complete(run_dir)
    assert 4 < last_step < 1000 and newest.name == f"step_{last_step:08d}"
    # What resumes from it is the preemption tests' (pretrain/test_faults.py): every step logged once, in order.
    assert read_marker(newest)["preempted_by"] == "SIGTERM"
    steps = [record["step"] for record in read_metrics(run_dir) if "train/loss" in record]
    assert steps == list(range(1, last_step + 1))


def test_a_stop_signal_while_the_ranks_start_ends_the_job_cleanly_asking_for_a_requeue(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 6}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    # Rank 0 writes the run's config once the ranks have met; verifying the data and building the engine follow.
    wait_for(run_dir / "config.yaml", job, poll=0.01)
    os.kill(job.pid, signal.SIGTERM)  # as `kill` or a scheduler's preemption notice to the launcher
    assert job.wait(timeout=120) == REQUEUE_EXIT_CODE, job.log.read_text()[-3000:]
    # No rank crashed on its way out: no traceback names a file of the project (torchrun prints one of its own, in
    # torch's files, for ranks that exited non-zero).
    log = job.log.read_text()
    named = [package.__name__ for package in (pretrain, data_pipeline) if f"{Path(package.__file__).parent}/" in log]
    assert not named, log[-3000:]
    assert complete_tags(run_dir) == [] and not losses_by_step(run_dir)
    # Nothing was left half made: the next launch trains the whole run.
    launch(config)
    assert sorted(losses_by_step(run_dir)) == list(range(1, 7))


def test_a_second_ctrl_c_stops_every_process_at_once(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 100000, "checkpoint_every": 100000}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    wait_for_step(run_dir, 2, job)
    processes = job_processes(job)
    ctrl_c(job)
    # The second comes once the launcher has taken the first: two SIGINTs pending at once would be one. Bit
    # SIGINT - 1 of /proc/PID/status's pending masks (the thread's, SigPnd, and the process's, ShdPnd), in hex.
    deadline = time.monotonic() + 10
    while any(int(line.split()[1], 16) & 1 << (signal.SIGINT - 1)
              for line in Path(f"/proc/{job.pid}/status").read_text().splitlines()
              if line.startswith(("SigPnd:", "ShdPnd:"))):
        assert time.monotonic() < deadline, "the launcher did not take the first Ctrl-C"
        time.sleep(0.01)
    ctrl_c(job)
    assert job.wait(timeout=30) == STOPPED_AT_ONCE_EXIT_CODE
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in processes):
        assert time.monotonic() < deadline, "a process of the job outlived the second Ctrl-C"
        time.sleep(0.1)
