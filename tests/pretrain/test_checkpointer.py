"""When a run saves, in-process: the checkpointer's timing and preemption, with a plain function for the writer."""

import pytest

from data_pipeline.errors import REQUEUE_EXIT_CODE
from pretrain.checkpointer import Checkpointer
from pretrain.config import Config
from pretrain.faults import Preempted


class Writes:
    """Stands in for checkpoint.save: records each call and returns the path a real save would."""

    def __init__(self):
        self.calls = []

    def __call__(self, engine, run_dir, step, loop_state, keep, preempted_by, spare):
        self.calls.append({"step": step, "loop_state": loop_state, "keep": keep, "preempted_by": preempted_by,
                           "spare": spare})
        return run_dir / "checkpoints" / f"step_{step:08d}"


def saved_steps(checkpointer: Checkpointer, steps: range) -> list[int]:
    return [step for step in steps if checkpointer.save(None, step, {"step": step}) is not None]


def test_saves_every_interval_at_the_extra_steps_and_at_the_last_step(tmp_path):
    writes = Writes()
    checkpointer = Checkpointer(tmp_path, every=4, last_step=10, extra_steps=(3, 4), keep=2, write=writes)
    assert saved_steps(checkpointer, range(1, 11)) == [3, 4, 8, 10]
    assert [call["loop_state"] for call in writes.calls] == [{"step": step} for step in (3, 4, 8, 10)]
    assert all(call["keep"] == 2 and call["spare"] == (3, 4) and call["preempted_by"] is None for call in writes.calls)


def test_is_built_from_the_train_section(tmp_path):
    config = Config(output_dir=str(tmp_path), name="run", train={
        "max_steps": 7, "checkpoint_every": 3, "checkpoint_steps": [5], "keep_checkpoints": 1})
    checkpointer = Checkpointer.from_config(config)
    assert (checkpointer.run_dir, checkpointer.keep) == (tmp_path / "run", 1)
    assert [step for step in range(1, 8) if checkpointer.due(step)] == [3, 5, 6, 7]


def test_a_preemption_saves_at_that_step_and_stops_the_run_to_be_requeued(tmp_path):
    writes = Writes()
    checkpointer = Checkpointer(tmp_path, every=100, last_step=1000, write=writes)
    assert checkpointer.save(None, 6, {"step": 6}) is None
    with pytest.raises(Preempted) as stopped:
        checkpointer.save(None, 7, {"step": 7}, preempted_by="SIGTERM")
    assert stopped.value.exit_code == REQUEUE_EXIT_CODE
    assert [(call["step"], call["preempted_by"]) for call in writes.calls] == [(7, "SIGTERM")]
    assert str(tmp_path / "checkpoints" / "step_00000007") in str(stopped.value)


def test_a_preemption_at_the_last_step_saves_and_lets_the_run_finish(tmp_path):
    writes = Writes()
    checkpointer = Checkpointer(tmp_path, every=100, last_step=9, write=writes)
    assert checkpointer.save(None, 9, {"step": 9}, preempted_by="SIGUSR1") == tmp_path / "checkpoints" / "step_00000009"
    assert [(call["step"], call["preempted_by"]) for call in writes.calls] == [(9, "SIGUSR1")]
