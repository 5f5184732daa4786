"""The checkpointing component, in-process in a world of one rank: when it saves, what it keeps, and what a run
resumes from, with the real checkpoint files (torch.save archives, markers) written by the real save."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from data_pipeline.common.errors import REQUEUE_EXIT_CODE, DataError
from pretrain import checkpoint_store
from pretrain.checkpoint_store import COMPLETE_MARKER, newest_complete, prune
from pretrain.checkpointer import Checkpointer, DataPosition
from pretrain.config import Config
from pretrain.faults import LossSpikes, NonFiniteGuard, Preempted
from pretrain.run_data import DataOrder


class FileEngine:
    """The part of a DeepSpeed engine the checkpointer uses, at ZeRO-0 on one rank: its weights and the loop
    state go to one torch.save archive per checkpoint, as DeepSpeed writes them."""

    def __init__(self, weight: float = 0.0):
        self.weights = {"w": torch.full((256,), weight)}

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        Path(directory, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.weights, **client_state}, Path(directory, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, directory, tag):
        saved = torch.load(Path(directory, tag, "mp_rank_00_model_states.pt"), weights_only=False)
        self.weights = saved.pop("module")
        return str(Path(directory, tag)), saved


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_config(tmp_path, **train) -> Config:
    return Config(name="run", output_dir=str(tmp_path), train={"max_steps": 100, "checkpoint_every": 4, **train},
                  deepspeed={"zero_stage": 0})


class Counter:
    """A registered component: a number that a resume must bring back."""

    def __init__(self):
        self.value = 0

    def loop_state(self, step: int) -> dict:
        return {"counter": self.value}

    def restore(self, loop_state: dict) -> None:
        self.value = loop_state["counter"]


def flip_a_byte(path: Path) -> None:
    """Damage that keeps the size: what the `complete` marker's file sizes cannot see."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


SEQUENCES_PER_STEP = 4


def checkpointer_with_state(config: Config) -> tuple[Checkpointer, Counter]:
    tokens_per_step = SEQUENCES_PER_STEP * config.model.seq_len
    checkpointer = Checkpointer.from_config(config)
    counter = Counter()
    checkpointer.register(data=DataPosition("fingerprint", DataOrder.of(config), lambda step: step * tokens_per_step),
                          counter=counter, non_finite_steps=NonFiniteGuard(3, config.run_dir, "fp32"),
                          loss_spikes=LossSpikes(3.0, 5))
    return checkpointer, counter


def timed(run_dir: Path, **timing) -> Checkpointer:
    """A checkpointer with the given timing, registering the data position every checkpoint records."""
    checkpointer = Checkpointer(run_dir, **timing)
    checkpointer.register(data=DataPosition("fingerprint", DataOrder.of(Config()), lambda step: step * 100))
    return checkpointer


def test_saves_every_interval_at_the_extra_steps_and_at_the_last_step(tmp_path, world_of_one):
    checkpointer = timed(tmp_path, every=4, last_step=10, extra_steps=(3, 4), keep=2)
    saved = [step for step in range(1, 11) if checkpointer.save(FileEngine(), step) is not None]
    assert saved == [3, 4, 8, 10]
    # Two kept besides the extra steps 3 and 4.
    assert [path.name for path in sorted((tmp_path / "checkpoints").iterdir())] == [
        f"step_{step:08d}" for step in (3, 4, 8, 10)]


def test_is_built_from_the_train_section(tmp_path):
    config = Config(output_dir=str(tmp_path), name="run", train={
        "max_steps": 7, "checkpoint_every": 3, "checkpoint_steps": [5], "keep_checkpoints": 1})
    checkpointer = Checkpointer.from_config(config)
    assert (checkpointer.run_dir, checkpointer.keep) == (tmp_path / "run", 1)
    assert [step for step in range(1, 8) if checkpointer.due(step)] == [3, 5, 6, 7]


def test_a_preemption_saves_at_that_step_and_stops_the_run_to_be_requeued(tmp_path, world_of_one):
    checkpointer = timed(tmp_path, every=100, last_step=1000)
    assert checkpointer.save(FileEngine(), 6) is None
    with pytest.raises(Preempted) as stopped:
        checkpointer.save(FileEngine(), 7, preempted_by="SIGTERM")
    assert stopped.value.exit_code == REQUEUE_EXIT_CODE
    saved = tmp_path / "checkpoints" / "step_00000007"
    assert checkpoint_store.read_marker(saved)["preempted_by"] == "SIGTERM"
    assert str(saved) in str(stopped.value)


def test_a_preemption_at_the_last_step_saves_and_lets_the_run_finish(tmp_path, world_of_one):
    checkpointer = timed(tmp_path, every=100, last_step=9)
    assert checkpointer.save(FileEngine(), 9, preempted_by="SIGUSR1") == tmp_path / "checkpoints" / "step_00000009"


def test_every_registered_component_comes_back_on_resume_with_the_engine(tmp_path, world_of_one):
    config = run_config(tmp_path)
    checkpointer, counter = checkpointer_with_state(config)
    counter.value = 17
    checkpointer.save(FileEngine(weight=2.5), 8)

    resumed, resumed_counter = checkpointer_with_state(config)
    resumption = resumed.plan_resume(config, warn=pytest.fail)
    assert (resumption.checkpoint, resumption.position) == (config.run_dir / "checkpoints" / "step_00000008", (8, 32))
    engine = FileEngine()
    resumed.resume(engine, resumption)
    assert resumed_counter.value == 17 and torch.equal(engine.weights["w"], torch.full((256,), 2.5))
    marker = checkpoint_store.read_marker(resumption.checkpoint)
    assert (marker["tokens_seen"], marker["data_order"]) == (32 * config.model.seq_len, DataOrder.of(config).record())


def test_a_resume_onto_other_data_is_refused_naming_the_checkpoint(tmp_path, world_of_one):
    config = run_config(tmp_path)
    checkpointer, _ = checkpointer_with_state(config)
    checkpointer.save(FileEngine(), 4)
    resumed = Checkpointer.from_config(config)
    resumed.register(data=DataPosition("other data", DataOrder.of(config), lambda step: 0))
    with pytest.raises(DataError, match=r"step_00000004: was trained on other data"):
        resumed.resume(FileEngine(), resumed.plan_resume(config, warn=pytest.fail))


def test_a_checkpoint_damaged_in_place_is_named_and_the_one_before_it_resumed(tmp_path, world_of_one):
    config = run_config(tmp_path, keep_checkpoints=2, checkpoint_every=1)
    checkpointer, counter = checkpointer_with_state(config)
    for step in (4, 8):
        counter.value = step
        checkpointer.save(FileEngine(weight=step), step)
    damaged = config.run_dir / "checkpoints" / "step_00000008"
    flip_a_byte(damaged / "mp_rank_00_model_states.pt")
    assert checkpoint_store.damage(damaged) is None  # its marker and sizes still agree

    warnings = []
    resumed, resumed_counter = checkpointer_with_state(config)
    resumption = resumed.plan_resume(config, warnings.append)
    engine = FileEngine()
    resumed.resume(engine, resumption)
    assert resumption.position == (4, 16) and resumed_counter.value == 4
    assert torch.equal(engine.weights["w"], torch.full((256,), 4.0))
    assert [warning.split(": ")[0] for warning in warnings] == [str(damaged)]

    # Training on from step 4 with keep=2: the damaged step 8 never counts among the kept, the new saves do.
    for step in (5, 6):
        resumed.save(engine, step)
    assert checkpoint_store.complete_tags(config.run_dir) == ["step_00000005", "step_00000006", "step_00000008"]
    assert resumed.plan_resume(config, lambda warning: None).position == (6, 24)


def test_pruning_never_counts_a_damaged_newest_checkpoint_among_those_kept(tmp_path):
    """The reproduction: steps 500 and 600 intact, step 1000's marker empty (damaged); keep=1 deleted every intact
    checkpoint and the next restart started from step 0."""
    for step in (500, 600, 1000):
        directory = tmp_path / "checkpoints" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        (directory / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1}) + "\n")
    (tmp_path / "checkpoints" / "step_00001000" / COMPLETE_MARKER).write_text("")
    prune(tmp_path, keep=1)
    assert newest_complete(tmp_path) == tmp_path / "checkpoints" / "step_00000600"
    # Nor the one just written, even when an intact newer one is left from before a resume went back.
    (tmp_path / "checkpoints" / "step_00001000" / COMPLETE_MARKER).write_text(
        json.dumps({"step": 1000, "world_size": 1}) + "\n")
    prune(tmp_path, keep=1, just_written="step_00000600")
    assert checkpoint_store.complete_tags(tmp_path) == ["step_00000600", "step_00001000"]


def test_the_checkpoints_folder_is_made_durable_once_a_new_checkpoint_appears_in_it(tmp_path, world_of_one,
                                                                                     monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    timed(tmp_path, every=1, last_step=10).save(FileEngine(), 1)
    marker_written = next(index for index, path in enumerate(synced) if f".{COMPLETE_MARKER}.partial" in path)
    # The folder's entry for step_00000001 is durable before the marker says the checkpoint is complete.
    assert str(tmp_path / "checkpoints") in synced[:marker_written]
