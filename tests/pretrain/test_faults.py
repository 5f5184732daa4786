"""Faults a week-long run meets: a rank that dies, a kill mid-save, preemption signals, non-finite steps.

The guard and the preemption vote are tested in-process; the rest with real 2-rank DeepSpeed jobs."""

import json
import math
import os
import signal
import time

import psutil
import pytest

from data_pipeline.common.errors import REQUEUE_EXIT_CODE
from pretrain.checkpoint_store import COMPLETE_MARKER, consolidated_state_dict, newest_complete
from pretrain.faults import (
    LossSpikes,
    NonFiniteGuard,
    PreemptionWatch,
    StoppedBeforeTraining,
    TooManyNonFiniteSteps,
)
from pretrain.rundir.reader import read_metrics
from tests.helpers import (
    job_processes,
    launch,
    losses_by_step,
    rank_pid,
    run_module,
    signal_job,
    start_launch,
    tiny_data_order,
    wait_for,
    wait_for_step,
)

FINITE, NAN = 2.5, float("nan")


def record(guard: NonFiniteGuard, step: int, loss: float = FINITE, optimizer_skipped: bool = False,
           step_applied: bool = True) -> str | None:
    return guard.record(step, loss, optimizer_skipped, step_applied)


def test_the_guard_counts_skipped_steps_alerts_once_per_streak_and_stops_a_streak_too_long(tmp_path):
    guard = NonFiniteGuard(limit=3, run_dir=tmp_path, precision="fp32")
    alerts = {}
    for step in range(1, 9):
        skipped = step in (3, 6, 7, 8)
        alerts[step] = record(guard, step, NAN if skipped else FINITE, optimizer_skipped=skipped,
                              step_applied=not skipped)
        assert guard.metrics() == {"train/skipped_steps": sum(s <= step for s in (3, 6, 7, 8))}
        if step < 8:
            guard.stop_if_too_many(step)
    assert [step for step, alert in alerts.items() if alert is not None] == [3, 6]
    assert "step 3" in alerts[3] and "step 6" in alerts[6]
    with pytest.raises(TooManyNonFiniteSteps) as stopped:
        guard.stop_if_too_many(8)
    assert "steps 6-8" in str(stopped.value) and "faults.max_consecutive_skipped_steps=3" in str(stopped.value)


def test_the_stop_names_the_newest_complete_checkpoint_to_resume_from(tmp_path):
    guard = NonFiniteGuard(limit=1, run_dir=tmp_path, precision="fp32")
    record(guard, 5, NAN, optimizer_skipped=True)
    with pytest.raises(TooManyNonFiniteSteps) as before_any_checkpoint:
        guard.stop_if_too_many(5)
    for step, complete in ((4, True), (5, False)):
        directory = tmp_path / "checkpoints" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        if complete:
            (directory / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 2}) + "\n")
    with pytest.raises(TooManyNonFiniteSteps) as after_one:
        guard.stop_if_too_many(5)
    assert "checkpoints" not in str(before_any_checkpoint.value)
    assert str(newest_complete(tmp_path)) in str(after_one.value) and "step_00000005" not in str(after_one.value)


def test_under_fp16_a_loss_scaler_skip_with_a_finite_loss_is_not_counted(tmp_path):
    fp16 = NonFiniteGuard(limit=2, run_dir=tmp_path, precision="fp16")
    # DeepSpeed's loss scaler skipped the update (its scaled gradients overflowed); the loss is finite.
    assert record(fp16, 1, FINITE, step_applied=False) is None
    assert record(fp16, 2, FINITE, step_applied=False) is None
    fp16.stop_if_too_many(2)
    assert fp16.metrics() == {"train/skipped_steps": 0}
    # A non-finite loss, or a skip by the project's optimizer, counts under fp16 too.
    assert record(fp16, 3, NAN, step_applied=False) is not None
    assert record(fp16, 4, FINITE, optimizer_skipped=True, step_applied=False) is None
    assert fp16.metrics() == {"train/skipped_steps": 2}
    bf16 = NonFiniteGuard(limit=2, run_dir=tmp_path, precision="bf16")
    assert record(bf16, 1, FINITE, step_applied=False) is not None


def test_the_skipped_count_survives_a_resume_through_the_loop_state_and_the_streak_does_not(tmp_path):
    guard = NonFiniteGuard(limit=2, run_dir=tmp_path, precision="fp32")
    record(guard, 1, NAN, optimizer_skipped=True)
    assert guard.loop_state(1) == {"non_finite_steps_skipped": 1}
    resumed = NonFiniteGuard(limit=2, run_dir=tmp_path, precision="fp32")
    resumed.restore({"step": 1, "data_fingerprint": "f", **guard.loop_state(1)})
    assert record(resumed, 2, NAN, optimizer_skipped=True) is not None  # a new streak: alerted again
    assert resumed.metrics() == {"train/skipped_steps": 2} and resumed.in_a_row == 1
    before_the_count = NonFiniteGuard(limit=2, run_dir=tmp_path, precision="fp32")
    before_the_count.restore({"step": 1, "data_fingerprint": "f"})
    assert before_the_count.metrics() == {"train/skipped_steps": 0}


def test_the_nan_drill_poisons_rank_zeros_loss_at_the_steps_asked(tmp_path):
    main = NonFiniteGuard(limit=3, run_dir=tmp_path, precision="fp32", drill_steps=[3, 6], is_main=True)
    other = NonFiniteGuard(limit=3, run_dir=tmp_path, precision="fp32", drill_steps=[3, 6], is_main=False)
    assert [step for step in range(1, 9) if main.poisons(step)] == [3, 6]
    assert not any(other.poisons(step) for step in range(1, 9))


@pytest.fixture
def preemption_watch():
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    yield PreemptionWatch()
    for number, handler in handlers.items():
        signal.signal(number, handler)


def test_a_preemption_signal_is_recorded_and_any_ranks_vote_stops_every_rank(preemption_watch):
    preemption_watch.start_training()
    assert preemption_watch.vote() == 0.0
    assert preemption_watch.agreed(0.0) is None
    assert preemption_watch.agreed(0.5) == "a signal to another rank"
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption_watch.vote() == 1.0
    assert preemption_watch.agreed(0.5) == "SIGUSR1"


def test_a_signal_before_the_first_step_stops_the_rank_at_once_asking_for_a_requeue(preemption_watch):
    with pytest.raises(StoppedBeforeTraining):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode: start-up work (hashing, converting) is cut short
    os.kill(os.getpid(), signal.SIGTERM)  # a second one, as the launcher repeats it, while the rank winds down
    # And if start-up code swallowed the exception, training still does not begin.
    with pytest.raises(StoppedBeforeTraining):
        preemption_watch.start_training()


def marker(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "complete").read_text())


def assert_resumed_from(run_dir, step: int, before: list[dict], last_step: int) -> None:
    """metrics.jsonl kept the records through `step` as the interrupted run wrote them (a run resumed from an
    earlier step would have logged them anew, at other speeds) and then has every later step once."""
    kept = [record for record in before if record["step"] <= step]
    after = read_metrics(run_dir)
    assert after[:len(kept)] == kept
    assert [record["step"] for record in after[len(kept):]] == list(range(step + 1, last_step + 1))


def test_a_rank_killed_mid_run_ends_the_job_quickly_and_resuming_gives_the_losses_it_had_reached(tiny_config,
                                                                                                  tmp_path):
    # One checkpoint, at step 4; the kill comes after step 6, so the resume trains steps 5-6 (and any the job
    # reached before it ended) a second time, and must find the same losses.
    config = tiny_config({"train": {"max_steps": 24, "checkpoint_every": 1000, "checkpoint_steps": [4]}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    wait_for(run_dir / "checkpoints" / "step_00000004" / "complete", job)
    wait_for_step(run_dir, 6, job)
    others = [pid for pid in job_processes(job) if pid != job.pid]  # torchrun, the ranks, their readers
    os.kill(rank_pid(job, rank=1), signal.SIGKILL)
    # Quickly: the other rank does not wait out a collective's timeout (deepspeed.timeout_minutes, 10), nor, once
    # failed, for its data readers at exit until torchrun kills it (after a 30 s grace).
    assert job.wait(timeout=25) != 0
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in others):
        assert time.monotonic() < deadline, "processes of the job outlived it"
        time.sleep(0.1)
    before = read_metrics(run_dir)
    reached = losses_by_step(run_dir)
    assert 6 <= max(reached) < 24

    assert newest_complete(run_dir) == run_dir / "checkpoints" / "step_00000004"
    launch(config)
    assert_resumed_from(run_dir, 4, before, last_step=24)
    resumed = losses_by_step(run_dir)
    assert [resumed[s] for s in range(5, max(reached) + 1)] == [reached[s] for s in range(5, max(reached) + 1)]


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

    # A rank file of another world size, as a save of this step by more ranks could have left: it must not be
    # merged into the step's next save.
    stale = saving / "zero_pp_rank_7_mp_rank_00_optim_states.pt"
    stale.write_bytes(b"stale")
    before = read_metrics(run_dir)
    launch(config)
    assert_resumed_from(run_dir, 4, before, last_step=12)
    assert not stale.exists()
    for step in (8, 12):
        checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
        written = marker(run_dir, step)
        assert written["step"] == step
        # The marker lists every file the save wrote, with its size.
        assert written["files"] == {path.name: path.stat().st_size for path in checkpoint.iterdir()
                                    if path.name != "complete"}


def test_sigusr2_makes_a_rank_print_where_each_of_its_threads_is_and_the_run_goes_on(tiny_config, tmp_path):
    """What a user does to a run that seems stuck: `kill -USR2` a rank, read its log, let it run."""
    config = tiny_config({"train": {"max_steps": 16, "checkpoint_every": 1000}, "eval": {"interval": 0}})
    run_dir = tmp_path / "runs" / "tiny"
    job = start_launch(config)
    wait_for_step(run_dir, 2, job)
    os.kill(rank_pid(job, rank=1), signal.SIGUSR2)
    assert job.wait(timeout=300) == 0
    assert max(losses_by_step(run_dir)) == 16
    assert "pretrain/train.py" in job.log.read_text()  # in the stack of the rank's main thread


# The resume after a preemption is the same whichever way the signal came; it is checked once.
@pytest.mark.parametrize(("stop_signal", "to_every_process", "resume"),
                         [(signal.SIGTERM, True, True), (signal.SIGUSR1, False, False)])
def test_a_preemption_signal_saves_a_checkpoint_at_that_step_and_asks_for_a_requeue(
        tiny_config, tmp_path, stop_signal, to_every_process, resume):
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
    checkpoint = run_dir / "checkpoints" / f"step_{last_step:08d}"
    files = {path.name: path.stat().st_size for path in checkpoint.iterdir() if path.name != "complete"}
    assert files
    assert marker(run_dir, last_step) == {
        "step": last_step, "world_size": 2, "zero_stage": 2, "preempted_by": stop_signal.name, "files": files,
        "data_order": tiny_data_order(), "tokens_seen": last_step * 2048}
    if resume:
        before = read_metrics(run_dir)
        launch(config, "train.max_steps=" + str(last_step + 2))
        assert_resumed_from(run_dir, last_step, before, last_step=last_step + 2)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_steps_are_skipped_and_counted_and_too_many_in_a_row_stop_the_run(tiny_config, tmp_path, stage):
    config = tiny_config({
        # Checkpoints around the first NaN step, to compare its weights, and the last one before the stop.
        "train": {"max_steps": 12, "checkpoint_every": 1000, "checkpoint_steps": [2, 3, 4, 7]},
        "deepspeed": {"zero_stage": stage},
        "faults": {"nan_loss_at_steps": [3, 6, 7, 8], "max_consecutive_skipped_steps": 3},
        "eval": {"interval": 0},
    })
    result = run_module("launch", "run", "--config", str(config), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"

    assert result.returncode == 1
    # Stopped without saving step 8; the message names the checkpoint to resume from (the guard's unit tests
    # check the rest of it).
    assert str(run_dir / "checkpoints" / "step_00000007") in result.stderr
    assert newest_complete(run_dir) == run_dir / "checkpoints" / "step_00000007"
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(records) == list(range(1, 9))
    assert math.isnan(records[3]["train/loss"]) and math.isfinite(records[4]["train/loss"])
    assert [records[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert not (run_dir / "checkpoints" / "step_00000008").exists()

    # A skipped step leaves the weights as they were.
    weights = {step: consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}") for step in (2, 3, 4)}
    assert all(weights[2][name].equal(weights[3][name]) for name in weights[2])
    assert not all(weights[3][name].equal(weights[4][name]) for name in weights[3])


def test_a_loss_above_the_factor_times_the_lowest_of_the_window_before_is_a_spike_and_the_count_resumes():
    losses = [4.0, 3.0, 2.0, 2.9, 3.1, 2.5, 6.0, float("nan"), 4.0, 3.0, 2.2]
    # Window 3, factor 1.5: 3.1 > 1.5 x 2.0; 6.0 > 1.5 x 2.5; 4.0 > 1.5 x 2.5 (the NaN step is left out of the
    # window); then 3.0 is not above 1.5 x 2.5, nor 2.2 above 1.5 x 3.0.
    whole = LossSpikes(factor=1.5, window=3)
    for loss in losses:
        whole.record(loss)
    assert whole.metrics() == {"train/loss_spikes": 3}

    first, resumed = LossSpikes(factor=1.5, window=3), LossSpikes(factor=1.5, window=3)
    for loss in losses[:5]:
        first.record(loss)
    resumed.restore(json.loads(json.dumps({"step": 5, **first.loop_state(5)})))  # as a checkpoint stores it
    for loss in losses[5:]:
        resumed.record(loss)
    assert resumed.metrics() == whole.metrics() and list(resumed.recent) == list(whole.recent)
