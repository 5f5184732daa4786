"""Real training runs: two DeepSpeed ranks over gloo on the CPU, started the way a user starts them; and the
step function with a stand-in engine, in-process."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.loader import TrainBatches, validation_batches
from data_pipeline.prepare import prepare
from data_pipeline.shard_reader import Windows
from pretrain.config import load_config
from pretrain.device import bf16_supported
from pretrain.loss import next_token_loss
from pretrain.model import GPT
from pretrain.rundir.reader import read_metrics
from pretrain.train import train_step
from tests.helpers import launch, losses_by_step, run_module, tiny_data_order, tiny_model, wandb_records
from tests.servers import FaultyProxy, Nginx


def wandb_history(run_dir: Path) -> list[dict]:
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    return [record["history"] for record in wandb_records(offline_run) if record["type"] == "history"]


def validation_losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["val/loss"] for record in read_metrics(run_dir) if "val/loss" in record}


def test_two_rank_zero2_run_lowers_the_loss_and_logs_it_to_jsonl_and_offline_wandb(tiny_config, tmp_path):
    config = tiny_config({
        "train": {"max_steps": 16, "checkpoint_every": 4, "keep_checkpoints": 2},
        "deepspeed": {"precision": "auto"},
        "logging": {"wandb_mode": "offline"},
    })
    launch(config)
    run_dir = tmp_path / "runs" / "tiny"

    validation = validation_losses(run_dir)
    assert sorted(validation) == [0, 4, 8, 12, 16]
    assert validation[16] < 0.8 * validation[0]
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[s] for s in (14, 15, 16)) < sum(losses[s] for s in (1, 2, 3))

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["deepspeed"]["zero_stage"] == 2 and saved["train"]["max_steps"] == 16
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    # precision auto: bf16 where this CPU's matrix units do it natively, fp32 otherwise
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["bf16"]["enabled"] == bf16_supported(torch.device("cpu"))
    # Only the newest two checkpoints are kept, each complete, written by 2 ranks.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000012", "step_00000016"]
    for step in (12, 16):
        checkpoint = checkpoints / f"step_{step:08d}"
        files = {path.name: path.stat().st_size for path in checkpoint.iterdir() if path.name != "complete"}
        assert files
        assert json.loads((checkpoint / "complete").read_text()) == {
            "step": step, "world_size": 2, "zero_stage": 2, "files": files, "data_order": tiny_data_order(),
            "tokens_seen": step * 2048}

    logged = {h["step"]["num"]: h["item"] for h in wandb_history(run_dir)}
    assert {step: logged[step]["train/loss"] for step in losses} == losses
    assert logged[16]["val/loss"] == pytest.approx(validation[16], abs=1e-4)
    assert "perf/tokens_per_second" in logged[16] and "train/grad_norm" in logged[16]


def test_a_damaged_shard_stops_the_launch_before_any_rank_starts(tiny_config, tmp_path):
    config = tiny_config()
    prepared = run_module("launch", "prepare", "--config", str(config), cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    shard = tmp_path / "data" / "train-00000-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])

    result = run_module("launch", "run", "--config", str(config), cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {shard}: ")
    assert not (tmp_path / "runs").exists()


def test_a_run_reading_its_shards_over_http_through_faults_has_the_losses_of_one_reading_local_files(shared_runs,
                                                                                                       tmp_path):
    reference = shared_runs.run_dir(2, ranks=2)  # the same run, on local shards
    with Nginx(shared_runs.data_dir, tmp_path / "nginx") as nginx, FaultyProxy(nginx.port) as proxy:
        config = shared_runs.config(reference.name, tmp_path / "runs", 2)
        config["data"].update(shard_url=proxy.url, fetch_timeout_seconds=5, fetch_retries=8)
        path = tmp_path / "remote.yaml"
        path.write_text(yaml.safe_dump(config))
        launch(path)
    assert all(count >= 1 for count in proxy.counts.values()), proxy.counts
    assert losses_by_step(tmp_path / "runs" / reference.name) == losses_by_step(reference)


def test_a_run_whose_server_no_longer_has_its_shards_stops_naming_the_shard(shared_runs, tmp_path):
    shared_runs.run_dir(2, ranks=2)  # which prepares the shared data
    served = tmp_path / "served"
    shutil.copytree(shared_runs.data_dir, served, ignore=shutil.ignore_patterns("train-*.tar"))
    config = shared_runs.config("gone", tmp_path / "runs", 2)
    with Nginx(served, tmp_path / "nginx") as nginx:
        config["data"].update(shard_url=nginx.url, fetch_retries=1)
        path = tmp_path / "gone.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_module("launch", "run", "--config", str(path), "--ranks", "2", cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert refusals, result.stderr
    for line in refusals:  # each rank's, and the run's "failed" alert: the shard's URL and the server's status
        assert re.search(rf"{re.escape(nginx.url)}/train-\d{{5}}-\d{{6}}\.tar\b", line), line
        assert re.search(r"\b404\b", line), line
    assert not any(record.get("step", 0) > 0 for record in read_metrics(tmp_path / "runs" / "gone"))


def test_resume_never_refuses_to_train_over_existing_checkpoints(tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 4}})
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (checkpoint / "complete").write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 2}) + "\n")

    result = run_module("launch", "run", "--config", str(config), "train.resume=never", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: train.resume:") and "runs/tiny" in result.stderr
    assert sorted(path.name for path in checkpoint.iterdir()) == ["complete", "mp_rank_00_model_states.pt"]
    assert (checkpoint / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


class RecordingEngine:
    """Stands in for the DeepSpeed engine around `model`: keeps the logits of every forward pass, updates nothing."""

    def __init__(self, model):
        self.model = model
        self.logits = []

    def __call__(self, inputs, document_ids):
        logits = self.model(inputs, document_ids)
        self.logits.append(logits.detach())
        return logits

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


class ObservingOptimizer:
    """Stands in for SkippingAdamW, whose hooks the step calls (a real optimizer costs seconds to import)."""

    def begin_step(self):
        self.losses = []

    def observe_loss(self, loss):
        self.losses.append(loss.detach())


def later_document_logits(window: torch.Tensor, masking: int | None, first_of_later: int) -> torch.Tensor:
    model = tiny_model(vocab_size=64, seq_len=len(window) - 1)
    engine = RecordingEngine(model)
    train_step(engine, ObservingOptimizer(), [window[None]], masking)
    (logits,) = engine.logits
    return logits[0, first_of_later:]


def test_with_document_masking_a_training_step_lets_no_token_see_an_earlier_document():
    end_of_document = 0
    draws = torch.Generator().manual_seed(0)
    window = torch.randint(1, 64, (17,), generator=draws)
    window[5] = end_of_document  # document one: positions 0-5; document two: 6 on
    changed = window.clone()
    changed[1:5] = torch.randint(1, 64, (4,), generator=draws)
    assert not changed.equal(window)

    masked, masked_after_change = (later_document_logits(w, end_of_document, 6) for w in (window, changed))
    assert torch.allclose(masked, masked_after_change, atol=1e-6)
    # Without masking the later document sees the change: the comparison above can fail.
    unmasked, unmasked_after_change = (later_document_logits(w, None, 6) for w in (window, changed))
    assert (unmasked - unmasked_after_change).abs().max() > 1e-3


def initial_losses(config_path: Path, ranks: int, masking: bool) -> tuple[float, float]:
    """The step-0 validation loss and the step-1 training loss of a run of `ranks` ranks, recomputed here from
    its initial weights (fp32, no dropout: what every rank computes) and its data, with or without masking."""
    config = load_config(config_path)
    layout = config.batch_layout(ranks)
    data = prepare(config.data, config.model.vocab_size)
    end_of_document_id = data.end_of_document_id if masking else None
    torch.manual_seed(config.seed)  # as the run builds its model
    model = GPT(config.model)
    validation, training = [], []
    with torch.no_grad():
        for rank in range(ranks):
            batches = validation_batches(Windows(data, "val", layout.seq_len), layout, rank, config.eval.batches)
            validation.append(sum(next_token_loss(model, b, end_of_document_id).item() for b in batches) / len(batches))
            step_one = TrainBatches(Windows(data, "train", layout.seq_len), layout, rank, config.data.shuffle_blocks,
                                    config.seed, mix_shards=config.data.mix_shards).step_windows(0)[0]
            micro_batches = step_one.split(layout.micro_batch_size)
            training.append(sum(next_token_loss(model, b, end_of_document_id).item() for b in micro_batches)
                            / layout.accumulation_steps)
    return sum(validation) / ranks, sum(training) / ranks


def test_training_with_document_masking_masks_attention_at_every_step_and_lowers_the_loss(tiny_config, tmp_path):
    config = tiny_config({"data": {"document_masking": True}, "train": {"max_steps": 8}})
    launch(config, ranks=1)  # masking is the same on every rank
    run_dir = tmp_path / "runs" / "tiny"
    validation = validation_losses(run_dir)
    assert validation[8] < 0.9 * validation[0]

    # The logged losses are those of a model that saw document ids, not of one that attended across documents.
    masked, unmasked = initial_losses(config, 1, masking=True), initial_losses(config, 1, masking=False)
    assert (validation[0], losses_by_step(run_dir)[1]) == pytest.approx(masked, abs=1e-5)
    assert all(abs(m - u) > 1e-4 for m, u in zip(masked, unmasked))  # ten times the tolerance above


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bit_training_on_a_gpu_lowers_the_loss(tiny_config, tmp_path, precision):
    config = tiny_config({"train": {"global_batch_tokens": 1024, "max_steps": 16},
                          "deepspeed": {"precision": precision}})
    launch(config, ranks=1)
    run_dir = tmp_path / "runs" / "tiny"
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config[precision]["enabled"]
    marker = json.loads((run_dir / "checkpoints" / "step_00000016" / "complete").read_text())
    assert marker["world_size"] == 1
    assert "system/gpu_memory_allocated_gib" in read_metrics(run_dir)[-1]  # the rank trained on the GPU
    validation = validation_losses(run_dir)
    assert validation[16] < 0.8 * validation[0]
