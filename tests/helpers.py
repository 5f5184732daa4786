"""Helpers for tests: a tiny run config and a way to start real training processes as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zstandard

from data_pipeline.config import DataConfig
from data_pipeline.shard_reader import ShardReader
from data_pipeline.tokenizer import train_bpe
from pretrain.config import ModelConfig
from pretrain.model import GPT
from pretrain.rundir.reader import read_metrics

# Small enough for a 2-rank DeepSpeed run in seconds on 2 CPU cores; in-context episodes only, so preparing
# the data takes about a second.
TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "model": {"vocab_size": 512, "seq_len": 64, "n_layer": 2, "n_head": 4, "d_model": 64},
    "data": {"sources": [{"kind": "icl_episodes", "episodes": 2000, "pairs_per_episode": 16}], "val_fraction": 0.1},
    "train": {
        "global_batch_tokens": 2048,  # 2 ranks x 2 accumulation x 8 sequences x 64 tokens
        "micro_batch_size": 8,
        "max_steps": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "checkpoint_every": 4,
    },
    "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    "eval": {"interval": 4, "batches": 2},
    "logging": {"wandb_mode": "disabled", "print_every": 1},
}


def tiny_data_order(global_batch_tokens: int = TINY_CONFIG["train"]["global_batch_tokens"]) -> dict:
    """The data order a checkpoint of the tiny config records."""
    return {"global_batch_tokens": global_batch_tokens, "seq_len": 64, "seed": 0, "shuffle_blocks": 64, "mix_shards": 8}


def run_module(module: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output."""
    environment = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(config: Path, *overrides: str, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Start a real training run with `ranks` DeepSpeed processes; fail the test with its output if it fails."""
    result = run_module("launch", "run", "--config", str(config), "--ranks", str(ranks), *overrides,
                        cwd=config.parent, timeout=timeout)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def start_launch(config: Path, *overrides: str, ranks: int = 2) -> subprocess.Popen:
    """Start a training job in the background, to interrupt it; its output goes to launch.log beside the config."""
    with open(config.parent / "launch.log", "ab") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "launch", "run", "--config", str(config), "--ranks", str(ranks), *overrides],
            cwd=config.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    job.log = config.parent / "launch.log"
    return job


def still_waiting(job: subprocess.Popen, what: str, deadline: float) -> None:
    """Fail if the job ended, or if the deadline passed; then with where each of its processes was waiting
    (SIGUSR2 makes every command of the project print its threads' stacks and go on) and its output's end."""
    assert job.poll() is None, f"the job ended (code {job.returncode}) before {what}"
    if time.monotonic() < deadline:
        return
    if hasattr(job, "log"):
        before = size = job.log.stat().st_size
        for pid in job_processes(job):
            try:
                if "torch.distributed.run" not in psutil.Process(pid).cmdline():  # torchrun has no handler
                    os.kill(pid, signal.SIGUSR2)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        # Until the stacks are in the log: it has grown, then kept its size for 0.5 s (10 s at most).
        written_by = time.monotonic() + 10
        while time.monotonic() < written_by:
            time.sleep(0.5)
            size, previous = job.log.stat().st_size, size
            if size == previous > before:
                break
    output = job.log.read_text(errors="replace")[-20000:] if hasattr(job, "log") else ""
    raise AssertionError(f"{what} did not happen in time; the job's output ends:\n{output}")


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        still_waiting(job, f"{path} appeared", deadline)
        time.sleep(poll)


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the running job has logged `step` (or a later one) to metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while not any(record["step"] >= step for record in read_metrics(run_dir)):
        still_waiting(job, f"step {step} was logged", deadline)
        time.sleep(0.02)


def job_processes(job: subprocess.Popen) -> list[int]:
    """The launcher and everything below it: torchrun, the ranks (each in a session of its own), readers."""
    try:
        return [job.pid, *(child.pid for child in psutil.Process(job.pid).children(recursive=True))]
    except psutil.NoSuchProcess:  # the launcher has ended: nothing is left below it to find
        return [job.pid]


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The process of one training rank: a child of torchrun, itself the launcher's child."""
    (torchrun,) = [child for child in psutil.Process(job.pid).children() if "torch.distributed.run" in child.cmdline()]
    for process in torchrun.children():
        if process.environ().get("RANK") == str(rank):
            return process.pid
    raise AssertionError(f"no process for rank {rank}")


def signal_job(job: subprocess.Popen, signal_number: int) -> None:
    """Signal every process of the job at once, as SLURM does on preemption or cancellation."""
    for pid in job_processes(job):
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


def wandb_records(offline_run: Path) -> list[dict]:
    """Every record of an offline W&B run directory, as `wandb leet inspect --json` reads them."""
    inspected = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline_run)],
        capture_output=True, text=True, check=True,
    )
    return [json.loads(line) for line in inspected.stdout.splitlines() if line.strip()]


# Words for small tokenizers and tasks in tests.
WORDS = "red green blue cyan amber violet small large tiny huge cat dog bird fish".split()


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in read_metrics(run_dir) if "train/loss" in record}


def split_stream(manifest, split: str) -> np.ndarray:
    """A split's token stream rebuilt from its blocks (each block repeats the previous block's last token)."""
    reader = ShardReader(manifest, split, None)
    blocks = [reader.block(i) for i in range(reader.block_count)]
    return np.concatenate([blocks[0]] + [block[1:] for block in blocks[1:]])


def episodes_config(directory, workers: int = 2, **changes) -> DataConfig:
    """A small real dataset: in-context episodes, small blocks and shards so there are many of each."""
    source = {"kind": "icl_episodes", "episodes": 600, **changes}
    return DataConfig(dir=str(directory), sources=[source], val_fraction=0.1, block_tokens=256, shard_bytes=8192,
                      workers=workers)


def mixed_sources(directory: Path) -> list[dict]:
    """Parquet files of several row groups, jsonl.zst files, a plain jsonl file read in byte ranges, and txt
    files, weighted: about 45 units in all."""
    directory.mkdir()
    words = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 9)) for i in range(3000)]
    for file in range(3):
        table = pa.table({"text": [f"{text} parquet {file}" for text in words[file * 600:(file + 1) * 600]]})
        pq.write_table(table, directory / f"part-{file}.parquet", row_group_size=64)
    for file in range(4):
        lines = "".join(json.dumps({"text": f"{text} jsonl {file}"}) + "\n" for text in words[file * 300:][:300])
        (directory / f"lines-{file}.jsonl.zst").write_bytes(zstandard.compress(lines.encode()))
    (directory / "plain.jsonl").write_text("".join(json.dumps({"text": f"{text} plain"}) + "\n" for text in words))
    for file in range(6):
        (directory / f"page-{file}.txt").write_text("\n".join(words[file * 40:(file + 1) * 40]))
    return [{"kind": "parquet", "paths": [str(directory / "*.parquet")]},
            {"kind": "jsonl", "paths": [str(directory / "*.jsonl.zst"), str(directory / "plain.jsonl")],
             "weight": 1.5},
            {"kind": "txt", "paths": [str(directory / "*.txt")], "weight": 3}]


def mixed_config(directory: Path, sources: list[dict], workers: int) -> DataConfig:
    return DataConfig(dir=str(directory), sources=sources, val_fraction=0.1, block_tokens=256, shard_bytes=16384,
                      partitions=8, workers=workers, unit_bytes=40_000)


def same_files(first: Path, second: Path) -> bool:
    names = sorted(path.name for path in first.iterdir())
    return names == sorted(path.name for path in second.iterdir()) and all(
        (first / name).read_bytes() == (second / name).read_bytes() for name in names)


def tiny_tokenizer():
    return train_bpe([" ".join(WORDS)] * 20 + ["the colour of the sky is blue", "a cat is not a dog"], 300)


def tiny_model(vocab_size: int, seq_len: int = 64) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():  # untrained logits are nearly flat; spread them so choices differ clearly
        model.token_embedding.weight.normal_(0, 1.0)
    return model.eval()


WATCHED_STEPS = 100
# Exported for the watched run as a user exports a token: no file of the run may hold it.
SECRET_VARIABLE, PLANTED_SECRET = "HF_TOKEN", "hf_planted_secret_4711"


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [record[kind] for record in records if record["type"] == kind]
