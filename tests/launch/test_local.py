import pytest

from tests.helpers import run_module


def test_zero_ranks_is_refused_before_anything_starts(tiny_config, tmp_path):
    result = run_module("launch", "run", "--config", str(tiny_config()), "--ranks", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: --ranks: must be at least 1, got 0"
    assert not (tmp_path / "runs").exists()


def test_a_single_rank_run_trains_and_records_its_world_size(tiny_config, tmp_path):
    config = tiny_config({"train": {"global_batch_tokens": 1024, "max_steps": 2, "checkpoint_every": 2}})
    result = run_module("launch", "run", "--config", str(config), "--ranks", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 rank(s) on cpu" in result.stdout
    marker = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002" / "complete"
    assert marker.read_text().strip() == '{"step": 2, "world_size": 1}'


@pytest.mark.gpu
def test_default_launch_uses_every_gpu_in_bf16(tiny_config, tmp_path):
    import torch

    config = tiny_config({"train": {"max_steps": 2}, "deepspeed": {"precision": "auto"}})
    gpus = torch.cuda.device_count()
    global_batch = 8 * 64 * gpus  # one micro-batch of 8 sequences of 64 tokens per GPU
    result = run_module("launch", "run", "--config", str(config), f"train.global_batch_tokens={global_batch}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{gpus} rank(s) on cuda, bf16" in result.stdout
