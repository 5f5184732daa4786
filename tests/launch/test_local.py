import pytest
import torch

from tests.helpers import run_module


def test_zero_ranks_is_refused_before_anything_starts(tiny_config, tmp_path):
    result = run_module("launch", "run", "--config", str(tiny_config()), "--ranks", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: --ranks: must be at least 1, got 0"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["deepspeed.precision=fp16"], "config error: deepspeed.precision: fp16 is not supported on this cpu; use fp32"
                                   " or auto"),
    (["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "deepspeed.grad_accum_dtype=fp32"],
     "config error: deepspeed.grad_accum_dtype: fp32 differs from the model's bf16, which DeepSpeed supports only"
     " under ZeRO; use zero_stage 1-3 or grad_accum_dtype=auto"),
])
def test_a_precision_setup_deepspeed_cannot_run_is_refused_before_anything_starts(tiny_config, tmp_path, overrides,
                                                                                   message):
    if "fp16" in overrides[0] and torch.cuda.is_available():
        pytest.skip("this machine has fp16")
    result = run_module("launch", "run", "--config", str(tiny_config()), *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_a_single_rank_run_trains_and_records_its_world_size(tiny_config, tmp_path):
    config = tiny_config({"train": {"global_batch_tokens": 1024, "max_steps": 2, "checkpoint_every": 2}})
    result = run_module("launch", "run", "--config", str(config), "--ranks", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 rank(s) on cpu" in result.stdout
    marker = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002" / "complete"
    assert marker.read_text().strip() == '{"step": 2, "world_size": 1, "zero_stage": 2}'


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
