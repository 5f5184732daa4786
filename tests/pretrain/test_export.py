"""An exported checkpoint is the trained model: whole fp32 weights, whatever ZeRO stage and ranks wrote it."""

import json
import re
import shutil

import pytest
import torch

from data_pipeline.loader import validation_batches
from data_pipeline.manifest import Manifest
from data_pipeline.shard_reader import Windows
from pretrain.checkpoint_store import COMPLETE_MARKER, tag_for_step
from pretrain.checkpoint_store import checkpoints_dir as checkpoint_dir
from pretrain.config import load_config
from pretrain.export import load_exported
from pretrain.export import main as export_main
from pretrain.loss import next_token_loss
from pretrain.rundir.reader import read_metrics


def test_an_exported_zero3_checkpoint_gives_the_validation_loss_the_run_logged(shared_runs, tmp_path, in_process):
    run_dir = tmp_path / "zero3"
    shutil.copytree(shared_runs.run_dir(stage=3, ranks=2), run_dir)
    last = shared_runs.steps

    result = in_process(export_main, str(run_dir))
    assert result.returncode == 0, result.stderr
    exported = run_dir / "export" / f"step_{last:08d}.pt"
    assert str(exported) in result.stdout
    model, step = load_exported(exported)
    assert step == last
    assert model.head.weight is model.token_embedding.weight

    # The run's last validation loss: each of 2 ranks' batches, averaged, as the training loop computes it.
    config = load_config(run_dir / "config.yaml")
    windows = Windows(Manifest.load(shared_runs.data_dir), "val", config.model.seq_len, None)
    layout = config.batch_layout(2)
    with torch.no_grad():
        per_rank = [
            sum(next_token_loss(model, batch, None).item() for batch in batches) / len(batches)
            for batches in (validation_batches(windows, layout, rank, config.eval.batches) for rank in (0, 1))
        ]
    logged = next(r["val/loss"] for r in read_metrics(run_dir) if r["step"] == last and "val/loss" in r)
    assert sum(per_rank) / 2 == pytest.approx(logged, rel=1e-5)


def test_exporting_a_step_without_a_checkpoint_names_the_steps_there_are(tmp_path, in_process):
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "config.yaml").parent.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: tiny\n")
    for step in (4, 8):  # what every rank finishing a save leaves: the complete marker
        tag = checkpoint_dir(run_dir) / tag_for_step(step)
        tag.mkdir(parents=True)
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 2}) + "\n")
    result = in_process(export_main, str(run_dir), "--step", "5")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {run_dir}: ")
    # The step asked for, then the steps there are.
    assert re.findall(r"\d+", result.stderr.removeprefix(f"error: {run_dir}: ")) == ["5", "4", "8"]
    assert not (run_dir / "export").exists()


def test_exporting_a_run_without_checkpoints_says_to_train_it_first(tmp_path, in_process):
    run_dir = tmp_path / "runs" / "never-trained"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: never-trained\n")
    result = in_process(export_main, str(run_dir))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {run_dir}: ")
    assert not (run_dir / "export").exists()
