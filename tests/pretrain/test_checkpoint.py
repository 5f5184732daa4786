"""Checkpoints: which ones a run keeps, and that they outlive the number of ranks that wrote them."""

import json
import shutil

import pytest
import yaml

from launch.__main__ import main as launch_main
from pretrain.checkpoint_store import (
    COMPLETE_MARKER,
    CheckpointError,
    complete_tags,
    newest_complete,
    prune,
    read_marker,
    resume_position,
    starting_checkpoint,
    unreadable,
)
from pretrain.config import Config
from pretrain.rundir.reader import read_metrics
from tests.helpers import launch, losses_by_step, run_module


def fake_checkpoints(run_dir, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        directory = run_dir / "checkpoints" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if step in complete:
            (directory / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 2}) + "\n")


def kept(run_dir) -> list[int]:
    return sorted(int(path.name.removeprefix("step_")) for path in (run_dir / "checkpoints").glob("step_*"))


def test_pruning_keeps_the_newest_complete_checkpoints_the_spare_steps_and_any_newer_save(tmp_path):
    fake_checkpoints(tmp_path, complete=[2, 3, 4, 6, 8], incomplete=[5, 9])
    prune(tmp_path, keep=2, spare=[3])
    # Older than the second-newest complete one (6) goes, complete or not, but the spare step 3; the save of
    # step 9, perhaps under way, stays.
    assert kept(tmp_path) == [3, 6, 8, 9]
    assert complete_tags(tmp_path) == ["step_00000003", "step_00000006", "step_00000008"]
    assert newest_complete(tmp_path) == tmp_path / "checkpoints" / "step_00000008"


def test_pruning_with_keep_zero_or_few_checkpoints_deletes_nothing(tmp_path):
    fake_checkpoints(tmp_path, complete=[2, 4], incomplete=[1])
    prune(tmp_path, keep=0)
    prune(tmp_path, keep=2)
    assert kept(tmp_path) == [1, 2, 4]


def test_a_damaged_checkpoint_is_passed_over_for_the_intact_one_before_it(tmp_path):
    weights = b"weights" * 100
    for step in (4, 8, 12, 16):
        directory = tmp_path / "checkpoints" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "mp_rank_00_model_states.pt").write_bytes(weights)
        marker = {"step": step, "world_size": 2, "zero_stage": 2, "files": {"mp_rank_00_model_states.pt": 700}}
        (directory / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000016" / COMPLETE_MARKER).write_text("")  # the disk filled as it was written
    (checkpoints / "step_00000012" / "mp_rank_00_model_states.pt").write_bytes(weights[:300])  # cut short since
    (checkpoints / "step_00000008" / "mp_rank_00_model_states.pt").unlink()

    warnings = []
    assert newest_complete(tmp_path, warnings.append) == checkpoints / "step_00000004"
    # Each damaged one is named, newest first.
    assert [warning.split(": ")[0] for warning in warnings] == [
        str(checkpoints / f"step_{step:08d}") for step in (16, 12, 8)]
    (checkpoints / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert newest_complete(tmp_path) is None


def test_an_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    config = Config(name="tiny", output_dir=str(tmp_path))
    # A save that died before every rank finished has no marker; the run goes back to step 4.
    fake_checkpoints(config.run_dir, complete=[4], incomplete=[8])
    assert starting_checkpoint(config) == config.run_dir / "checkpoints" / "step_00000004"
    assert starting_checkpoint(Config(name="tiny", output_dir=str(tmp_path), train={"resume": "never"})) is None


# Shrinking and growing, through the plain load (ZeRO-0) and the universal form (ZeRO-2 and 3).
@pytest.mark.parametrize(("stage", "ranks"), [(0, 1), (2, 3), (3, 1)])
def test_a_two_rank_checkpoint_resumes_at_another_world_size_with_the_uninterrupted_losses(shared_runs, tmp_path,
                                                                                          stage, ranks):
    uninterrupted = shared_runs.run_dir(stage, ranks=2)
    halfway, last = shared_runs.steps // 2, shared_runs.steps
    run_dir = tmp_path / uninterrupted.name
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{last:08d}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(shared_runs.config(uninterrupted.name, tmp_path, stage)))
    launch(config, ranks=ranks)

    checkpoints = run_dir / "checkpoints"
    # ZeRO-0 in fp32 keeps the optimizer state whole, which loads at any world size as it is; the other
    # stages resume through DeepSpeed's universal form, converted once beside the checkpoint.
    assert (checkpoints / f"step_{halfway:08d}" / "universal" / COMPLETE_MARKER).exists() == bool(stage)
    assert read_marker(checkpoints / f"step_{last:08d}")["world_size"] == ranks
    # Records through the halfway step kept, the later steps logged once each by the resumed run.
    assert [record["step"] for record in read_metrics(run_dir)] == list(range(last + 1))
    resumed = losses_by_step(run_dir)
    assert [resumed[s] for s in range(halfway + 1, last + 1)] == pytest.approx(
        shared_runs.losses(stage, ranks=2)[halfway:], rel=1e-4)


def resumable_copy(shared_runs, tmp_path) -> tuple:
    """A copy of the 2-rank ZeRO-2 shared run, stopped at its halfway checkpoint; and its config's path."""
    uninterrupted = shared_runs.run_dir(2, ranks=2)
    run_dir = tmp_path / uninterrupted.name
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{shared_runs.steps:08d}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(shared_runs.config(uninterrupted.name, tmp_path, 2)))
    return run_dir, config


def test_a_real_checkpoint_damaged_in_place_is_passed_over_and_the_run_trains_on_from_the_one_before(shared_runs,
                                                                                                       tmp_path):
    uninterrupted = shared_runs.run_dir(2, ranks=2)
    halfway, last = shared_runs.steps // 2, shared_runs.steps
    run_dir = tmp_path / uninterrupted.name
    shutil.copytree(uninterrupted, run_dir)
    damaged = run_dir / "checkpoints" / f"step_{last:08d}"
    rank_one_share = damaged / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    content = bytearray(rank_one_share.read_bytes())
    content[len(content) // 2] ^= 0xFF  # a flipped byte: the size, and so the marker, still agree
    rank_one_share.write_bytes(bytes(content))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(shared_runs.config(uninterrupted.name, tmp_path, 2)))
    launch(config)

    # Every rank went back to the halfway checkpoint (rank 1 alone found the damage) and trained the second half
    # again, as the uninterrupted run did; the last checkpoint is whole again.
    assert unreadable(damaged, rank=0, world_size=1) is None
    resumed = losses_by_step(run_dir)
    assert [resumed[s] for s in range(halfway + 1, last + 1)] == pytest.approx(
        shared_runs.losses(2, ranks=2)[halfway:], rel=1e-4)


def test_a_resume_that_would_change_the_data_order_is_refused_naming_the_setting(shared_runs, tmp_path, in_process):
    run_dir, config = resumable_copy(shared_runs, tmp_path)
    before = sorted((path.relative_to(run_dir), path.stat().st_mtime_ns) for path in run_dir.rglob("*"))
    for change, named in (("train.global_batch_tokens=3072", "train.global_batch_tokens: 1536 -> 3072"),
                          ("model.seq_len=32", "model.seq_len: 64 -> 32"), ("seed=1", "seed: 0 -> 1"),
                          ("data.shuffle_blocks=8", "data.shuffle_blocks: 64 -> 8"),
                          ("data.mix_shards=1", "data.mix_shards: 8 -> 1")):
        refused = in_process(launch_main, "run", "--config", str(config), change)
        assert refused.returncode == 1 and named in refused.stderr, refused.stderr
    assert sorted((path.relative_to(run_dir), path.stat().st_mtime_ns) for path in run_dir.rglob("*")) == before


def test_a_checkpoint_from_before_shard_mixing_is_refused_as_another_order_unless_told_to_continue(tmp_path):
    """Its position means the unmixed order; resuming would repeat and skip windows of the mixed one."""
    checkpoint = tmp_path / "step_00000010"
    checkpoint.mkdir()
    order = {"global_batch_tokens": 4096, "seq_len": 128, "seed": 0, "shuffle_blocks": 64}
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 10, "data_order": order, "tokens_seen": 40960}))
    config = Config.model_validate({"train": {"global_batch_tokens": 4096}, "model": {"seq_len": 128}})
    with pytest.raises(CheckpointError, match="data.mix_shards: unrecorded -> 8"):
        resume_position(checkpoint, config)
    told = Config.model_validate({"train": {"global_batch_tokens": 4096, "data_order_change": "continue_by_tokens"},
                                  "model": {"seq_len": 128}})
    assert resume_position(checkpoint, told) == (10, 40960 // 128)


def test_a_resume_told_to_continue_by_tokens_after_a_change_of_batch_goes_on_from_the_tokens_seen(shared_runs,
                                                                                                   tmp_path):
    run_dir, config = resumable_copy(shared_runs, tmp_path)
    halfway, last = shared_runs.steps // 2, shared_runs.steps
    launch(config, "train.global_batch_tokens=3072", "train.data_order_change=continue_by_tokens")
    tokens = {record["step"]: record["train/tokens"] for record in read_metrics(run_dir) if "train/loss" in record}
    assert tokens == {step: 1536 * min(step, halfway) + 3072 * max(0, step - halfway) for step in range(1, last + 1)}
    marker = read_marker(run_dir / "checkpoints" / f"step_{last:08d}")
    assert marker["tokens_seen"] == tokens[last] and marker["data_order"]["global_batch_tokens"] == 3072


def test_a_checkpoint_of_another_zero_stage_is_refused_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 8}})
    # What the refusal reads of a checkpoint is its marker, as a 2-rank ZeRO-2 run wrote it at step 4.
    fake_checkpoints(tmp_path / "runs" / "tiny", complete=[4], incomplete=[])
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000004"
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 2}) + "\n")
    result = run_module("launch", "run", "--config", str(config), "deepspeed.zero_stage=3", cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {checkpoint}: ")
    assert "deepspeed.zero_stage=2" in result.stderr  # the setting that would resume it
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


def test_a_branch_from_a_checkpoint_that_is_not_complete_is_refused_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config()
    half_written = tmp_path / "runs" / "trunk" / "checkpoints" / "step_00000004"
    half_written.mkdir(parents=True)  # as a crash mid-save leaves it: no `complete` marker
    result = run_module("launch", "run", "--config", str(config), f"train.branch_from={half_written}", cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: train.branch_from: {half_written}")
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()
