"""The memory planner: `python -m launch plan`, and `launch run` refusing what does not fit."""

from pathlib import Path

import pytest
import torch
import yaml

from launch.__main__ import main as launch_main
from launch.planner import USABLE_FRACTION, gpu_memory_here, gpu_precision, make_plan, parse_memory
from launch.sweep import expand
from launch.sweep_spec import load_sweep
from pretrain.config import load_config
from pretrain.memory import estimate
from tests.helpers import run_module

REPOSITORY = Path(__file__).parents[2]
GPT2_124M = REPOSITORY / "configs" / "presets" / "gpt2-124m-parquet.yaml"
# The quickstart made 300M parameters large: far beyond 2 GiB, whatever the stage.
OVERSIZED = ["model.n_layer=24", "model.d_model=1024", "model.n_head=16"]


def test_an_oversized_run_is_refused_with_the_plans_line_before_anything_starts(tiny_config, tmp_path):
    config_path = tiny_config()
    result = run_module("launch", "run", "--config", str(config_path), "--gpu-memory", "2GiB", *OVERSIZED,
                        cwd=tmp_path)
    assert result.returncode == 2
    config = load_config(config_path, OVERSIZED)
    plan = make_plan(config, 2, 2 * 2**30, gpu_precision(config))
    assert not plan.fits
    assert result.stderr.strip().splitlines()[-1] == f"config error: {plan.recommendation}"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_the_dry_run_prints_the_plan_and_the_command_of_a_run_that_fits(in_process, tiny_config):
    config_path = tiny_config()
    result = in_process(launch_main, "run", "--config", str(config_path), "--gpu-memory", "80GiB", "--dry-run")
    assert result.returncode == 0, result.stderr
    config = load_config(config_path)
    plan = make_plan(config, 2, 80 * 2**30, gpu_precision(config))
    assert plan.fits
    lines = result.stdout.splitlines()
    assert plan.recommendation in lines
    assert "torch.distributed.run" in lines[-1] and "pretrain.train" in lines[-1]


def test_the_plan_suggests_the_cheapest_change_that_fits():
    """GPT-2 124M on 8 GPUs of 16 GiB at micro-batch 64 does not fit; a smaller micro-batch at the configured
    stage does, and the plan says which, with the accumulation that keeps the global batch."""
    config = load_config(GPT2_124M, ["train.micro_batch_size=64"])
    memory = 16 * 2**30
    plan = make_plan(config, 8, memory, "bf16")
    assert not plan.fits
    stage = config.deepspeed.zero_stage
    largest = plan.options[stage].largest_micro_batch
    assert largest is not None and largest < 64
    assert f"train.micro_batch_size={largest} " in plan.recommendation
    assert f"accumulation {64 // largest})" in plan.recommendation
    count = plan.parameters
    fits = estimate(config, count, 8, "bf16", stage, False, largest).total
    doubled = estimate(config, count, 8, "bf16", stage, False, 2 * largest).total
    assert fits <= memory * USABLE_FRACTION < doubled


def test_every_option_reports_the_largest_micro_batch_that_fits():
    """For each stage, with and without checkpointing, the reported micro-batch fits and the next divisor of a
    rank's sequences per step does not."""
    config = load_config(GPT2_124M)
    memory = 24 * 2**30
    plan = make_plan(config, 8, memory, "bf16")
    assert plan.sequences_per_rank == 64
    for option in plan.options:
        row, largest = option.at_configured_micro_batch, option.largest_micro_batch
        assert largest is not None
        totals = {size: estimate(config, plan.parameters, 8, "bf16", row.zero_stage, row.checkpointing, size).total
                  for size in (largest, 2 * largest)}
        assert totals[largest] <= memory * USABLE_FRACTION
        if largest < 64:
            assert totals[2 * largest] > memory * USABLE_FRACTION


def test_the_plan_command_prints_a_row_per_stage_and_checkpointing(in_process):
    result = in_process(launch_main, "plan", "--config", str(GPT2_124M), "--gpus", "8", "--gpu-memory", "80GiB")
    assert result.returncode == 0, result.stderr
    plan = make_plan(load_config(GPT2_124M), 8, 80 * 2**30, "bf16")
    lines = result.stdout.splitlines()
    assert lines[-1] == plan.recommendation
    row_starts = [[str(stage), checkpointing] for checkpointing in ("no", "yes") for stage in range(4)]
    rows = [line.split() for line in lines if line.split()[:2] in row_starts]
    assert len(rows) == 8
    for row, option in zip(rows, plan.options):
        assert float(row[7]) == pytest.approx(option.at_configured_micro_batch.total / 2**30, abs=0.006)


@pytest.mark.parametrize(("argv", "named"), [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory"),
    (["--gpus", "7"], "train.global_batch_tokens"),
])
def test_a_bad_plan_request_is_refused_with_one_line(in_process, argv, named):
    result = in_process(launch_main, "plan", "--config", str(GPT2_124M), *argv)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("config error: ") and named in result.stderr


def test_memory_sizes_read_as_people_write_them():
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("40GB") == 40 * 10**9
    assert parse_memory("1024") == 1024


@pytest.mark.gpu
def test_the_memory_of_this_hosts_gpus_is_what_cuda_reports():
    reported = min(torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count()))
    assert gpu_memory_here() == pytest.approx(reported, rel=0.02)


def test_a_sweep_on_slurm_refuses_before_submitting_a_run_that_does_not_fit_naming_it(tiny_config, tmp_path,
                                                                                      in_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "ladder", "base": str(tiny_config()), "output_dir": str(tmp_path / "runs"), "seeds": [0],
        "sizes": [{"n_layer": 1, "d_model": 32, "n_head": 2}, {"n_layer": 48, "d_model": 2048, "n_head": 16}],
        "tokens_per_parameter": [0.01],
    }))
    result = in_process(launch_main, "sweep", "--spec", str(spec), "--backend", "slurm", "--nodes", "1",
                        "--gpus-per-node", "2", "--gpu-memory", "16GiB", "--dry-run")
    assert result.returncode == 2
    small, large = expand(load_sweep(spec))
    assert make_plan(small.config, 2, 16 * 2**30, gpu_precision(small.config)).fits
    plan = make_plan(large.config, 2, 16 * 2**30, gpu_precision(large.config))
    assert result.stderr.strip().splitlines()[-1] == f"config error: {large.name}: {plan.recommendation}"
    assert "#SBATCH" not in result.stdout
