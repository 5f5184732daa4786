"""Checkpoints outlive the number of ranks that wrote them."""

import shutil

import pytest

from tests.helpers import launch, run_module
from tests.helpers import losses_by_step


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_two_rank_checkpoint_resumes_on_one_and_three_ranks_with_the_uninterrupted_losses(tiny_config, tmp_path,
                                                                                             stage):
    config = tiny_config({
        # 24 sequences a step: 6, 3 or 2 micro-batches of 4 on 1, 2 or 3 ranks.
        "train": {"global_batch_tokens": 24 * 64, "micro_batch_size": 4, "max_steps": 8, "checkpoint_every": 4},
        "deepspeed": {"zero_stage": stage},
        "eval": {"interval": 0},
    })
    launch(config, ranks=2)
    uninterrupted = losses_by_step(tmp_path / "runs" / "tiny")

    for ranks in (1, 3):
        output_dir = tmp_path / f"resumed-on-{ranks}"
        shutil.copytree(tmp_path / "runs", output_dir)
        shutil.rmtree(output_dir / "tiny" / "checkpoints" / "step_00000008")
        result = launch(config, f"output_dir={output_dir}", ranks=ranks)
        # ZeRO-0 in fp32 keeps the optimizer state whole, which loads at any world size as it is.
        how = ", written by 2 ranks, through its universal form" if stage else ""
        assert f"resumed from step_00000004 (step 4){how}\n" in result.stdout
        resumed = losses_by_step(output_dir / "tiny")
        assert [resumed[s] for s in range(5, 9)] == pytest.approx([uninterrupted[s] for s in range(5, 9)], rel=1e-4)


def test_a_checkpoint_of_another_zero_stage_is_refused_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 4}})
    launch(config)
    result = run_module("launch", "run", "--config", str(config), "deepspeed.zero_stage=3", "train.max_steps=8",
                        cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000004"
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {checkpoint}: was written with ZeRO-2 and this run uses ZeRO-3; resume it with"
        " deepspeed.zero_stage=2, or start a new run (a new name)"
    )
    assert "step 5" not in result.stdout


def test_a_branch_from_a_checkpoint_that_is_not_complete_is_refused_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config()
    half_written = tmp_path / "runs" / "trunk" / "checkpoints" / "step_00000004"
    half_written.mkdir(parents=True)  # as a crash mid-save leaves it: no `complete` marker
    result = run_module("launch", "run", "--config", str(config), f"train.branch_from={half_written}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: train.branch_from: {half_written} is not a complete checkpoint (no 'complete' marker); train the run"
        " it belongs to past that step first, or point it at one of that run's complete checkpoints"
    )
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()
