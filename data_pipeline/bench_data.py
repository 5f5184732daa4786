"""Data pipeline benchmark: `python -m data_pipeline.bench_data [--repeats N] [--megabytes M]` (or `make bench-data`).

1. Prepare throughput, MB of text per second per tokenizer process, against raw `tokenizers`
   `encode_batch` on the same text, single-threaded, in the same run. The ratio is the pipeline's overhead
   (reading jsonl, splitting, packing, writing and hashing shards). Both use the same trained tokenizer, so
   BPE training is not timed.
2. Loader throughput: tokens per second from local shards through the training loader, in the main process
   and with one DataLoader worker (global order, shuffle, window cutting, batching and, for the worker,
   handing batches to the training process included), over several epochs.
3. Streamed reading: the same through one worker from 1 MiB shards, read from local files and from an HTTP
   server on this machine (Python's http.server), each shard fetched into a temporary file and checked as it
   arrives (remote.py); the reader keeps 8 shards open, so most are fetched again each epoch.

Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_pipeline.common.command_line import ArgumentParser
from data_pipeline.config import BatchLayout, DataConfig
from data_pipeline.loader import TrainBatches, iterate_steps
from data_pipeline.prepare import prepare
from data_pipeline.shard_reader import Windows
from data_pipeline.sources import all_documents
from data_pipeline.tokenizer import load_tokenizer

EPOCHS = 4  # loader passes over the prepared text, so worker start-up is a small part of the time


def corpus(megabytes: float) -> list[str]:
    """The embedded corpus's documents, repeated until `megabytes` of text."""
    documents = list(all_documents(DataConfig()))
    size = sum(len(d.encode()) for d in documents)
    return documents * max(1, round(megabytes * 1e6 / size))


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def loader_rate(manifest, seq_len: int, layout: BatchLayout, shard_url: str | None, workers: int = 1) -> float:
    """Tokens per second through the training loader over EPOCHS epochs."""
    start = time.perf_counter()
    batches = TrainBatches(Windows(manifest, "train", seq_len, shard_url), layout, 0, 64, seed=0)
    steps = iterate_steps(batches, 0, EPOCHS * batches.steps_per_epoch, workers)
    tokens = sum(tokens.numel() for _, (tokens, _window_ids) in steps)
    return tokens / (time.perf_counter() - start)


@contextmanager
def serving(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on a free local port, in a thread; yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m data_pipeline.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=20.0, help="text to prepare per run")
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # raw encode_batch on one thread: the per-process baseline

    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        documents = corpus(args.megabytes)
        megabytes = sum(len(d.encode()) for d in documents) / 1e6
        source = work / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        reference = prepare(DataConfig(dir=str(work / "reference")), vocab_size=2048, log=lambda *_: None)
        tokenizer = load_tokenizer(reference.tokenizer_path, 2048)

        def prepare_once(run: int) -> None:
            config = DataConfig(
                dir=str(work / f"run{run}"), sources=[{"kind": "jsonl", "paths": [str(source)]}],
                tokenizer=str(reference.tokenizer_path), workers=1, shard_bytes=64 * 2**20,
            )
            prepare(config, vocab_size=2048, log=lambda *_: None)

        encode_all = functools.partial(tokenizer.encode_batch, documents)
        raw = statistics.median(megabytes / timed(encode_all) for _ in range(args.repeats))
        pipeline = statistics.median(megabytes / timed(lambda r=r: prepare_once(r)) for r in range(args.repeats))

        manifest = prepare(DataConfig(dir=str(work / "run0"), sources=[{"kind": "jsonl", "paths": [str(source)]}],
                                      tokenizer=str(reference.tokenizer_path), workers=1,
                                      shard_bytes=64 * 2**20), vocab_size=2048, log=lambda *_: None)
        # 64 windows per step: one rank's share of a 0.5M-token global batch on 8 GPUs at seq_len 1024.
        layout = BatchLayout(world_size=1, seq_len=args.seq_len, micro_batch_size=8, accumulation_steps=8)
        loader_rates = {workers: statistics.median(loader_rate(manifest, args.seq_len, layout, None, workers)
                                                   for _ in range(args.repeats)) for workers in (0, 1)}

        small = prepare(DataConfig(dir=str(work / "small-shards"), sources=[{"kind": "jsonl", "paths": [str(source)]}],
                                   tokenizer=str(reference.tokenizer_path), workers=1, shard_bytes=2**20),
                        vocab_size=2048, log=lambda *_: None)
        with serving(small.dir) as url:
            streamed = {where: statistics.median(loader_rate(small, args.seq_len, layout, shard_url)
                                                 for _ in range(args.repeats))
                        for where, shard_url in (("local files", None), ("HTTP", url))}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; text: {megabytes:.1f} MB")
    print(f"raw encode_batch (1 thread):       {raw:6.2f} MB/s")
    print(f"prepare (1 tokenizer process):     {pipeline:6.2f} MB/s per process = {pipeline / raw:.2f}x raw")
    for workers, rate in loader_rates.items():
        where = "main process" if workers == 0 else f"{workers} worker"
        print(f"loader, seq_len {args.seq_len}, {where}: {rate / 1e6:6.1f} M tokens/s")
    local = streamed["local files"]
    for where, rate in streamed.items():
        print(f"loader, 1 MiB shards, 1 worker, {where}: {rate / 1e6:6.1f} M tokens/s = {rate / local:.2f}x local")


if __name__ == "__main__":
    main()
