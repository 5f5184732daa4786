"""The local backend. What the launcher refuses or only prints is checked in-process, through the entry point's
own main(); one refusal, and the runs, go through `python -m launch` as a user types it."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from launch.__main__ import main as launch_main
from tests.helpers import run_module, tiny_data_order


def nothing_written(directory: Path) -> bool:
    return not (directory / "runs").exists() and not (directory / "data").exists()


def test_zero_ranks_is_refused_with_one_line_before_anything_starts(tiny_config, tmp_path):
    result = run_module("launch", "run", "--config", str(tiny_config()), "--ranks", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("config error: --ranks: ")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(("overrides", "field"), [
    (["deepspeed.precision=fp16"], "deepspeed.precision"),
    (["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "deepspeed.grad_accum_dtype=fp32"],
     "deepspeed.grad_accum_dtype"),
])
def test_a_precision_setup_deepspeed_cannot_run_is_refused_before_anything_starts(in_process, tiny_config, tmp_path,
                                                                                   overrides, field):
    if "fp16" in overrides[0] and torch.cuda.is_available():
        pytest.skip("this machine has fp16")
    result = in_process(launch_main, "run", "--config", str(tiny_config()), *overrides)
    assert result.returncode == 2
    assert result.stderr.startswith(f"config error: {field}:")
    assert nothing_written(tmp_path)


def test_a_single_rank_run_trains_and_records_its_world_size(shared_runs):
    run_dir = shared_runs.run_dir(stage=2, ranks=1)
    checkpoint = run_dir / "checkpoints" / f"step_{shared_runs.steps:08d}"
    files = {path.name: path.stat().st_size for path in checkpoint.iterdir() if path.name != "complete"}
    assert files
    assert json.loads((checkpoint / "complete").read_text()) == {
        "step": shared_runs.steps, "world_size": 1, "zero_stage": 2, "files": files,
        "data_order": tiny_data_order(24 * 64), "tokens_seen": shared_runs.steps * 24 * 64}


@pytest.mark.gpu
def test_default_launch_uses_every_gpu_in_bf16(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 2}, "deepspeed": {"precision": "auto"}})
    gpus = torch.cuda.device_count()
    global_batch = 8 * 64 * gpus  # one micro-batch of 8 sequences of 64 tokens per GPU
    result = run_module("launch", "run", "--config", str(config), f"train.global_batch_tokens={global_batch}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    marker = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000002" / "complete"
    assert json.loads(marker.read_text())["world_size"] == gpus
    assert json.loads((tmp_path / "runs" / "tiny" / "deepspeed_config.json").read_text())["bf16"]["enabled"]


@pytest.mark.parametrize(("arguments", "option"), [
    (["--backend", "slurm", "--nodes", "0"], "--nodes"),
    (["--gpus-per-node", str(torch.cuda.device_count() + 1)], "--gpus-per-node"),
    (["--nodes", "2"], "--nodes"),  # the local backend is this machine alone
    (["--backend", "hostfile", "--hostfile", "no-such-hostfile"], "--hostfile"),
    (["--backend", "cluster"], "--backend"),
])
def test_bad_launch_requests_are_refused_with_one_line_before_anything_starts(in_process, tiny_config, tmp_path,
                                                                              monkeypatch, arguments, option):
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--config", str(tiny_config()), *arguments)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("config error: ") and option in result.stderr
    assert nothing_written(tmp_path)


def test_without_sbatch_on_path_the_slurm_backend_refuses_naming_it(in_process, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no SLURM
    result = in_process(launch_main, "run", "--backend", "slurm", "--config", str(tiny_config()))
    assert result.returncode == 2
    assert result.stderr.startswith("config error: --backend slurm:") and "sbatch" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_runs_print_what_would_run_and_start_nothing(in_process, tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    local = in_process(launch_main, "run", "--config", str(config), "--ranks", "4", "--dry-run", "train.lr=1e-3")
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip() == shlex.join([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "-m", "pretrain.train",
        "--config", str(config), "train.lr=1e-3"])

    script = in_process(launch_main, "run", "--config", str(config), "--backend", "slurm", "--nodes", "2",
                        "--ranks", "2", "--dry-run", "launch.slurm.partition=gpu", "train.global_batch_tokens=4096")
    assert script.returncode == 0, script.stderr
    lines = script.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --requeue",
            "#SBATCH --signal=USR1@120"} <= set(lines)
    assert any(line.startswith("srun ") and " -m launch node --nodes \"$SLURM_NNODES\" --ranks-per-node 2 " in line
               for line in lines)
    assert nothing_written(tmp_path)


def test_a_secret_in_the_config_is_refused_and_one_exported_is_never_written(in_process, tiny_config, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    refused = in_process(launch_main, "run", "--config", str(config), "launch.environment.HF_TOKEN=planted-secret")
    assert refused.returncode == 2 and "HF_TOKEN" in refused.stderr and "planted-secret" not in refused.stderr
    assert not (tmp_path / "runs").exists()
    # Exported where the job is submitted from, as the refusal says: SLURM passes it on; no file holds it.
    monkeypatch.setenv("HF_TOKEN", "planted-secret")
    submitted = in_process(launch_main, "run", "--backend", "slurm", "--dry-run", "--config", str(config),
                           "launch.environment.TOKENIZERS_PARALLELISM='false'")
    assert submitted.returncode == 0, submitted.stderr
    assert "TOKENIZERS_PARALLELISM" in submitted.stdout and "planted-secret" not in submitted.stdout
    written = [path for path in tmp_path.rglob("*") if path.is_file() and b"planted-secret" in path.read_bytes()]
    assert written == []


@pytest.mark.parametrize("override", ["launch.slurm.account=research --wrap=rm", 'launch.slurm.job_name="two words"'])
def test_an_sbatch_value_that_would_split_into_more_options_is_refused(in_process, tiny_config, tmp_path,
                                                                       monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--backend", "slurm", "--dry-run", "--config", str(tiny_config()),
                        override)
    assert result.returncode == 2 and "#SBATCH" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_there_is_no_restart_in_place_to_rely_on(in_process, tiny_config, tmp_path, monkeypatch):
    # torchrun's elastic restarts failed on gloo (the restarted ranks could not reconnect); the option is gone,
    # and a user who asks for it is told so rather than left believing a failed rank comes back.
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--config", str(tiny_config()), "--max-restarts", "2")
    assert result.returncode == 2 and "--max-restarts" in result.stderr
    assert not (tmp_path / "runs").exists()
