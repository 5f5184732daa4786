"""Real training runs: two DeepSpeed ranks over gloo on the CPU, started the way a user starts them."""

import re
from pathlib import Path

import pytest
import yaml

from pretrain.metrics import read_metrics
from tests.helpers import launch, losses_by_step, run_module, wandb_records


def wandb_history(run_dir: Path) -> list[dict]:
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    return [record["history"] for record in wandb_records(offline_run) if record["type"] == "history"]


def test_two_rank_zero2_run_lowers_the_loss_and_logs_it_to_jsonl_and_offline_wandb(tiny_config, tmp_path):
    config = tiny_config({
        "train": {"max_steps": 16},
        "deepspeed": {"precision": "auto"},
        "logging": {"wandb_mode": "offline"},
    })
    result = launch(config)
    run_dir = tmp_path / "runs" / "tiny"

    assert "2 rank(s) on cpu" in result.stdout and "ZeRO-2" in result.stdout
    first, last = map(float, re.search(r"validation loss: (\S+) at step 0 -> (\S+) at step 16", result.stdout).groups())
    assert last < 0.8 * first
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[s] for s in (14, 15, 16)) < sum(losses[s] for s in (1, 2, 3))

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["deepspeed"]["zero_stage"] == 2 and saved["train"]["max_steps"] == 16
    assert (run_dir / "checkpoints" / "step_00000016" / "complete").exists()

    logged = {h["step"]["num"]: h["item"] for h in wandb_history(run_dir)}
    assert {step: logged[step]["train/loss"] for step in losses} == losses
    assert logged[16]["val/loss"] == last or abs(logged[16]["val/loss"] - last) < 1e-4
    assert "perf/tokens_per_second" in logged[16] and "train/grad_norm" in logged[16]


def test_a_damaged_shard_stops_the_launch_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config()
    prepared = run_module("launch", "prepare", "--config", str(config), cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    shard = tmp_path / "data" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])

    result = run_module("launch", "run", "--config", str(config), cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {shard}: sha256 ") and lines[0].endswith("prepare the data again")
    assert not (tmp_path / "runs").exists()


def test_incomplete_checkpoint_is_never_resumed_from(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 8, "checkpoint_every": 4}})
    launch(config)
    run_dir = tmp_path / "runs" / "tiny"
    # A save that died before every rank finished has no marker; the run goes back to step 4.
    (run_dir / "checkpoints" / "step_00000008" / "complete").unlink()
    result = launch(config)
    assert "resumed from step_00000004 (step 4)" in result.stdout


def test_resume_never_refuses_to_train_over_existing_checkpoints(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 4}})
    launch(config)
    checkpoint_file = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    before = checkpoint_file.read_bytes()

    result = run_module("launch", "run", "--config", str(config), "train.resume=never", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: train.resume:") and "runs/tiny" in result.stderr
    assert checkpoint_file.read_bytes() == before


def test_training_with_document_masking_lowers_the_loss(tiny_config, tmp_path):
    result = launch(tiny_config({"data": {"document_masking": True}, "train": {"max_steps": 8}}))
    first, last = map(float, re.search(r"validation loss: (\S+) at step 0 -> (\S+) at step 8", result.stdout).groups())
    assert last < 0.9 * first


def test_only_the_newest_checkpoints_are_kept_when_asked(tiny_config, tmp_path):
    launch(tiny_config({"train": {"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2}}))
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert all((checkpoints / tag / "complete").exists() for tag in ("step_00000006", "step_00000008"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bit_training_on_a_gpu_lowers_the_loss(tiny_config, tmp_path, precision):
    config = tiny_config({"train": {"global_batch_tokens": 1024, "max_steps": 16}, "deepspeed": {"precision": precision}})
    result = launch(config, ranks=1)
    assert f"1 rank(s) on cuda, {precision}" in result.stdout
    first, last = map(float, re.search(r"validation loss: (\S+) at step 0 -> (\S+) at step 16", result.stdout).groups())
    assert last < 0.8 * first
