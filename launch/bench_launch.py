"""Launch-level benchmarks, each timing the commands a user types: `python -m launch.bench_launch prepare|startup`.

prepare   `python -m launch prepare` of one corpus (jsonl files, a given tokenizer, so BPE training is not
          timed) by 1 and by 2 workers: processes (--backend local) or SLURM array tasks of one process each
          (--backend slurm, on a login node; timed until the data directory appears). Ratio: 1 / 2.
startup   `python -m launch run` of a tiny 2-rank model on one corpus of 50,000 64-token blocks sharded into
          10, 1,000 and 50,000 shards: seconds from the command to the first step in metrics.jsonl, and the
          largest resident memory of a rank meanwhile. Each dataset is verified once before it is timed
          (verification runs at disk speed and is recorded; see docs/data.md). Ratio: to the fewest shards.

Each figure is the median of --repeats runs, the variants alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from data_pipeline.common.command_line import ArgumentParser
from data_pipeline.config import DataConfig
from data_pipeline.manifest import MANIFEST
from data_pipeline.prepare import prepare
from data_pipeline.sources import all_documents


def corpus_files(directory: Path, megabytes: float, files: int) -> list[str]:
    """The embedded corpus's documents repeated to `megabytes` of text, in `files` jsonl files."""
    documents = list(all_documents(DataConfig()))
    documents *= max(1, round(megabytes * 1e6 / sum(len(d.encode()) for d in documents)))
    directory.mkdir(parents=True)
    for index in range(files):
        lines = (json.dumps({"text": text}) + "\n" for text in documents[index::files])
        (directory / f"part-{index:03d}.jsonl").write_text("".join(lines))
    return [str(directory / "*.jsonl")]


def command_seconds(arguments: list[str], cwd: Path, done: Path | None = None) -> float:
    """Seconds from starting `python -m <arguments>` to its end, or (`done`) to that path appearing."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *arguments], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    while done is not None and not done.exists():
        time.sleep(0.05)
    return time.perf_counter() - start


def bench_prepare(args: argparse.Namespace, work: Path) -> None:
    paths = corpus_files(work / "corpus", args.megabytes, files=16)
    tokenizer = prepare(DataConfig(dir=str(work / "tokenizer")), vocab_size=2048, log=lambda *_: None).tokenizer_path
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in seconds:
            data_dir = work / f"data-{workers}-{repeat}"
            config = work / f"prepare-{workers}-{repeat}.yaml"
            config.write_text(yaml.safe_dump({"model": {"vocab_size": 2048}, "data": {
                "dir": str(data_dir), "sources": [{"kind": "jsonl", "paths": paths}], "tokenizer": str(tokenizer),
                "partitions": 16, "workers": 1 if args.backend == "slurm" else workers}}))
            command = ["launch", "prepare", "--config", str(config), "--backend", args.backend,
                       "--tasks", str(workers)]
            seconds[workers].append(command_seconds(command, work, data_dir / MANIFEST))
    one, two = (statistics.median(seconds[workers]) for workers in (1, 2))
    unit = "SLURM tasks" if args.backend == "slurm" else "processes"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; text: {args.megabytes} MB")
    print(f"prepare, 1 of {unit}:  {one:6.1f} s ({args.megabytes / one:.2f} MB/s)")
    print(f"prepare, 2 of {unit}:  {two:6.1f} s ({args.megabytes / two:.2f} MB/s) = {one / two:.2f}x")


BLOCK_TOKENS = 64
SAMPLE_BYTES = (BLOCK_TOKENS + 1) * 2  # a block's tokens as uint16: what a shard's size counts


def dataset_config(directory: Path, shards: int, blocks: int) -> DataConfig:
    """The same corpus of about `blocks` 64-token blocks (in-context episodes of about 50 tokens), sharded into
    about `shards` shards: only the number of shards differs between the datasets."""
    per_shard = -(-blocks // shards)
    return DataConfig(dir=str(directory), block_tokens=BLOCK_TOKENS, shard_bytes=per_shard * SAMPLE_BYTES,
                      partitions=1, val_fraction=0.05,
                      sources=[{"kind": "icl_episodes", "episodes": blocks * BLOCK_TOKENS // 50,
                                "pairs_per_episode": 24}])


def largest_rank_rss(launcher: int) -> int:
    largest = 0
    for process in psutil.Process(launcher).children(recursive=True):
        try:  # a short-lived helper process may end between the listing and the question
            if "pretrain.train" in " ".join(process.cmdline()):
                largest = max(largest, process.memory_info().rss)
        except psutil.Error:
            continue
    return largest


def time_to_first_step(config: Path, run_dir: Path, cwd: Path) -> tuple[float, float]:
    """(seconds to the first logged step, largest rank RSS in MiB) of one launch, which is then stopped."""
    start = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "launch", "run", "--config", str(config), "--ranks", "2"], cwd=cwd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, peak = run_dir / "metrics.jsonl", 0
    try:
        while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
            if job.poll() is not None:
                raise SystemExit(f"the run ended (code {job.returncode}) before its first step; see {run_dir}")
            peak = max(peak, largest_rank_rss(job.pid))
            time.sleep(0.02)
        return time.perf_counter() - start, peak / 2**20
    finally:
        # The ranks run in sessions of their own (launch/local.py): each process of the job is stopped by name.
        for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
            try:
                process.kill()
            except psutil.Error:
                continue
        job.wait()


def bench_startup(args: argparse.Namespace, work: Path) -> None:
    counts = [int(count) for count in args.shards.split(",")]
    datasets = {count: dataset_config(work / f"data-{count}", count, blocks=max(counts)) for count in counts}
    for count, data in datasets.items():
        made = len(prepare(data, vocab_size=512, log=lambda *_: None).splits["train"])
        print(f"{count} shards asked, {made} made", flush=True)
    results: dict[int, list[tuple[float, float]]] = {count: [] for count in counts}
    for repeat in range(args.repeats + 1):  # the first round verifies each dataset once, untimed
        for count in counts:
            name = f"start-{count}-{repeat}"
            config = work / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "name": name, "output_dir": str(work / "runs"), "seed": 0,
                "model": {"vocab_size": 512, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 64},
                "data": datasets[count].model_dump(mode="json"),
                "train": {"global_batch_tokens": 1024, "micro_batch_size": 8, "max_steps": 1000},
                "deepspeed": {"precision": "fp32"}, "eval": {"interval": 0, "batches": 1},
                "logging": {"wandb_mode": "disabled", "print_every": 1},
            }))
            measured = time_to_first_step(config, work / "runs" / name, work)
            if repeat:
                results[count].append(measured)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    first = statistics.median(seconds for seconds, _ in results[counts[0]])
    for count in counts:
        seconds = statistics.median(seconds for seconds, _ in results[count])
        memory = statistics.median(rss for _, rss in results[count])
        print(f"{count:>6} shards: first step after {seconds:5.1f} s ({seconds / first:.2f}x),"
              f" rank RSS {memory:6.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m launch.bench_launch", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("prepare", "startup"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=40.0, help="prepare: text per preparation")
    parser.add_argument("--backend", choices=("local", "slurm"), default="local", help="prepare: where")
    parser.add_argument("--shards", default="10,1000,50000", help="startup: the datasets' shard counts")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="launch-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        (bench_prepare if args.what == "prepare" else bench_startup)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
