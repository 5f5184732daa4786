import os
import shlex
import subprocess
import sys
from pathlib import Path

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


def refused(tmp_path, *arguments: str) -> str:
    """Run a launch request that must be refused: exit code 2, one line, nothing written."""
    result = run_module("launch", "run", *arguments, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    return result.stderr.strip()


def test_bad_launch_requests_are_refused_with_one_line_before_anything_starts(tiny_config, tmp_path):
    config = str(tiny_config())
    assert refused(tmp_path, "--config", config, "--backend", "slurm", "--nodes", "0") == (
        "config error: --nodes: must be at least 1, got 0")
    assert refused(tmp_path, "--config", config, "--gpus-per-node", "4") == (
        f"config error: --gpus-per-node: 4 requested, this host has {torch.cuda.device_count()} GPU(s)")
    assert refused(tmp_path, "--config", config, "--nodes", "2") == (
        "config error: --nodes: the local backend runs on this machine only; use --backend hostfile or slurm")
    missing = tmp_path / "no-such-hostfile"
    assert refused(tmp_path, "--config", config, "--backend", "hostfile", "--hostfile", str(missing)) == (
        f"config error: --hostfile: {missing} does not exist; write one line per host: `node1 slots=8`")
    assert refused(tmp_path, "--config", config, "--backend", "cluster").startswith(
        "config error: argument --backend: invalid choice: 'cluster'")


def test_without_sbatch_on_path_the_slurm_backend_says_so(tiny_config, tmp_path):
    environment = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no SLURM
    result = subprocess.run([sys.executable, "-m", "launch", "run", "--backend", "slurm", "--config",
                             str(tiny_config())], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: --backend slurm: sbatch is not on PATH; run this on a SLURM login node, or use --dry-run")
    assert not (tmp_path / "runs").exists()


def test_dry_runs_print_what_would_run_and_start_nothing(tiny_config, tmp_path):
    config = tiny_config()
    local = run_module("launch", "run", "--config", str(config), "--ranks", "4", "--dry-run", "train.lr=1e-3",
                       cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip() == shlex.join([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "-m", "pretrain.train",
        "--config", str(config), "train.lr=1e-3"])

    script = run_module("launch", "run", "--config", str(config), "--backend", "slurm", "--nodes", "2",
                        "--ranks", "2", "--dry-run", "launch.slurm.partition=gpu", "train.global_batch_tokens=4096",
                        cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    lines = script.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --requeue",
            "#SBATCH --signal=USR1@120"} <= set(lines)
    assert any(line.startswith("srun ") and " -m launch node --nodes \"$SLURM_NNODES\" --ranks-per-node 2 " in line
               for line in lines)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()

