"""One job per run directory: the lock rank 0 holds, in-process and between two real launches."""

import multiprocessing
import os
import signal
import socket

import pytest
import yaml

from pretrain.config import merged
from pretrain.rundir.reader import read_metrics
from pretrain.runlock import RunInUse, RunLock
from tests.helpers import TINY_CONFIG, rank_pid, run_module, signal_job, start_launch, wait_for_step


def hold_until_killed(run_dir, ready) -> None:
    RunLock.take(run_dir)
    ready.set()
    signal.pause()


def test_a_run_held_by_a_live_process_is_refused_naming_it_and_free_once_that_process_dies(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=hold_until_killed, args=(tmp_path / "run", ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunInUse) as refused:
            RunLock.take(tmp_path / "run")
        assert f"pid {holder.pid}" in str(refused.value) and socket.gethostname() in str(refused.value)
        with pytest.raises(RunInUse):  # what a launcher asks before any work
            RunLock.refuse_if_held(tmp_path / "run")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a crash ends it: no chance to release anything
        holder.join()
    with RunLock.take(tmp_path / "run") as lock:
        assert lock.descriptor is not None
    # Released on leaving: another holder may take it at once.
    RunLock.refuse_if_held(tmp_path / "run")
    RunLock.take(tmp_path / "run").release()
    # A run never trained has nothing to hold, and asking creates nothing.
    RunLock.refuse_if_held(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_second_launch_of_a_run_in_training_is_refused_and_the_first_trains_on_undisturbed(tmp_path):
    config = merged(TINY_CONFIG, {"output_dir": str(tmp_path / "runs"), "data": {"dir": str(tmp_path / "data")},
                                  "train": {"max_steps": 5000, "checkpoint_every": 10, "keep_checkpoints": 1}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "runs" / "tiny"
    first = start_launch(path)
    wait_for_step(run_dir, 2, first)
    holder = rank_pid(first, 0)

    second = run_module("launch", "run", "--config", str(path), "--ranks", "2", cwd=tmp_path)
    assert second.returncode == 1
    assert f"pid {holder}" in second.stderr

    assert first.poll() is None  # the first job trains on
    wait_for_step(run_dir, max(record["step"] for record in read_metrics(run_dir)) + 2, first)
    signal_job(first, signal.SIGKILL)
    first.wait()
    # One job's records, every step once and in order, and its own checkpoint, the one it kept.
    steps = [record["step"] for record in read_metrics(run_dir) if "train/loss" in record]
    assert steps == list(range(1, len(steps) + 1))
    assert len(list((run_dir / "checkpoints").glob("step_*/complete"))) == 1
