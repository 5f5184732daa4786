"""Prepare a dataset once: sources -> tokenizer -> partitions (tokenized and sharded in parallel) -> manifest.

`data.dir` then holds:
    tokenizer.json                  the byte-level BPE (trained here, or a copy of the given one)
    train-00000-000000.tar ...      webdataset shards (split, partition, number); each sample is one block of
    val-00000-000000.tar ...        tokens (`<key>.tokens`, raw little-endian uint16 or uint32); documents end
                                    with the end-of-document token
    manifest.json                   shards with their samples, tokens and sha256, the tokenizer's hash, the
                                    source mixture, and a fingerprint of all of it

The work happens in `.<dir>.partial/`, renamed to `data.dir` once the manifest is written: a crash never leaves
a half-written dataset where a run looks for one, and an existing dataset made from a different recipe is
refused, never overwritten. What a killed preparation finished (the tokenizer, whole partitions, the merge) is
kept there and reused by the next one of the same recipe, which finishes the rest. The shards depend on the recipe
alone (see partitions.py), not on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from data_pipeline.common.errors import DataError
from data_pipeline.common.files import publish_directory, write_atomically
from data_pipeline.config import DataConfig
from data_pipeline.manifest import FORMAT_VERSION, MANIFEST, Manifest
from data_pipeline.partitions import (
    PARTITIONS,
    Claims,
    clear_abandoned,
    is_done,
    merge,
    plan,
    start_worker,
    write_partition,
)
from data_pipeline.sources import all_documents, describe, is_validation
from data_pipeline.tokenizer import END_OF_DOCUMENT, file_sha256, id_bound, load_tokenizer, train_bpe

RECIPE = "recipe.json"


def recipe_fingerprint(data: DataConfig, vocab_size: int) -> str:
    """What the shards are made from: any change here means different shards."""
    recipe = {
        "format": FORMAT_VERSION,
        "sources": [source.model_dump(mode="json") for source in data.sources],
        "tokenizer": file_sha256(data.tokenizer) if data.tokenizer else None,
        "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
        "vocab_size": vocab_size,
        "val_fraction": data.val_fraction,
        "block_tokens": data.block_tokens,
        "shard_bytes": data.shard_bytes,
        "partitions": data.partitions,
        "unit_bytes": data.unit_bytes,
        "python": sys.version_info[:2],  # the stdlib docstrings differ between Python versions
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def tokenizer_sample(data: DataConfig) -> Iterator[str]:
    """Training documents for the BPE, from all sources, up to tokenizer_sample_bytes."""
    budget = data.tokenizer_sample_bytes
    for text in all_documents(data):
        if budget <= 0:
            return
        if not is_validation(text, data.val_fraction):
            budget -= len(text.encode())
            yield text


def _open_existing(directory: Path, recipe: str) -> Manifest:
    if not (directory / MANIFEST).exists():
        raise DataError(
            f"{directory}: exists but holds no prepared data (no {MANIFEST}); point data.dir elsewhere or remove it"
        )
    manifest = Manifest.load(directory)
    if manifest.recipe != recipe:
        raise DataError(
            f"{directory}: was prepared from a different data config or tokenizer; set data.dir to a new"
            " directory, or remove this one to rebuild it"
        )
    return manifest


def staging_dir(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.partial")


def prepare(data: DataConfig, vocab_size: int, log=print) -> Manifest:
    """Prepare `data.dir` if needed, here with data.workers processes, and return its manifest. Reuses a directory
    prepared from the same recipe, and what an interrupted preparation of it finished."""
    directory = Path(data.dir)
    recipe = recipe_fingerprint(data, vocab_size)
    if directory.exists():
        return _open_existing(directory, recipe)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # One preparation of a directory at a time (two launches, two nodes of a job): the others wait, then reuse it.
    with exclusive(directory.with_name(f".{directory.name}.lock"),
                   lambda: log(f"waiting for another preparation of {directory} to finish")):
        if directory.exists():
            return _open_existing(directory, recipe)
        begin_preparation(data, vocab_size, log)
        prepare_partitions(data, vocab_size)
        return finish_preparation(data, vocab_size, log)


def begin_preparation(data: DataConfig, vocab_size: int, log=print) -> None:
    """The first step, on one machine: the staging folder (or the interrupted one resumed) and the tokenizer."""
    staging = open_staging(Path(data.dir), recipe_fingerprint(data, vocab_size), log)
    tokenizer_step(staging, data, vocab_size)


def prepare_partitions(data: DataConfig, vocab_size: int, claims: Claims | None = None) -> None:
    """Write the partitions not done yet with data.workers processes: all of them, or (with `claims`, one task
    of a job array among others) each that this task claims first, one at a time as its workers free up."""
    staging = resumable_staging(data, vocab_size)
    if (staging / MANIFEST).exists():  # merged already: the partitions are in the shards
        return
    dtype = storage_dtype(load_tokenizer(staging / "tokenizer.json", vocab_size))
    units = plan(data)
    candidates = iter([p for p in range(data.partitions) if not is_done(staging, p)])
    # Spawned, not forked: no copies of the parent's threads. An executor, not a Pool: a worker that dies (the
    # out-of-memory killer picks the largest process) breaks it, where a Pool would wait for it forever.
    context = multiprocessing.get_context("spawn")
    workers = data.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, context, start_worker, (str(staging / "tokenizer.json"),)) as pool, \
            tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=None) as progress:

        def start_next() -> set[Future]:
            for partition in candidates:
                if claims is None or claims.take(partition):
                    return {pool.submit(write_partition, staging, data, dtype, partition, units[partition])}
            return set()

        running = set().union(*(start_next() for _ in range(workers)))
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for job in finished:
                    progress.update(job.result())
                    running |= start_next()
        except BrokenProcessPool:
            raise DataError(f"{staging}: a preparation worker died (killed, or out of memory: each holds one"
                            " partition's tokens at a time); the partitions it finished are kept, and running the"
                            " preparation again writes the rest") from None
        finally:  # after a failure, start nothing more, and wait only for what is running
            pool.shutdown(cancel_futures=True)


def finish_preparation(data: DataConfig, vocab_size: int, log=print) -> Manifest:
    """The last step, once every partition is done: the closing shards and the manifest, then `data.dir`. Killed
    at any point, it is finished by running it again."""
    staging = resumable_staging(data, vocab_size)
    if not (staging / MANIFEST).exists():  # written once every shard is in place
        missing = [p for p in range(data.partitions) if not is_done(staging, p)]
        if missing:
            raise DataError(f"{staging}: partitions {missing[:5]}{'...' if len(missing) > 5 else ''} of"
                            f" {data.partitions} are not written yet; run the preparation again to write them")
        tokenizer = load_tokenizer(staging / "tokenizer.json", vocab_size)
        write_manifest(staging, data, recipe_fingerprint(data, vocab_size), tokenizer, storage_dtype(tokenizer), log)
    clear_scaffolding(staging)
    return Manifest.load(publish_directory(staging, Path(data.dir)))  # durable before anyone reads it, whole


def clear_scaffolding(staging: Path) -> None:
    """Remove what only the preparation needed: the partitions (in the shards now), the recipe (in the manifest)
    and the partial files of writes that a kill interrupted (write_atomically's `.NAME.partial-PID`)."""
    if (staging / PARTITIONS).exists():
        shutil.rmtree(staging / PARTITIONS)
    (staging / RECIPE).unlink(missing_ok=True)
    for partial in staging.glob(".*.partial-*"):
        partial.unlink()


def resumable_staging(data: DataConfig, vocab_size: int) -> Path:
    """The staging folder begin_preparation made for this recipe."""
    staging = staging_dir(Path(data.dir))
    if recorded_recipe(staging) != recipe_fingerprint(data, vocab_size) or not (staging / "tokenizer.json").exists():
        raise DataError(f"{staging}: no preparation of this data config was begun there; run `python -m launch"
                        " prepare --config CONFIG` to begin one")
    return staging


def recorded_recipe(staging: Path) -> str | None:
    """The recipe a staging folder is being prepared from (its record, or the manifest once the record is
    cleared), or None if it holds no readable record of one."""
    for record in (RECIPE, MANIFEST):
        try:
            return json.loads((staging / record).read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def open_staging(directory: Path, recipe: str, log) -> Path:
    """The folder a preparation works in: one left by an interrupted preparation of the same recipe is resumed
    (the temporary folders of its dead workers cleared); one of another recipe is cleared."""
    staging = staging_dir(directory)
    if recorded_recipe(staging) == recipe:
        clear_abandoned(staging)
        log(f"preparing data in {directory}, resuming an interrupted preparation")
        return staging
    shutil.rmtree(staging, ignore_errors=True)
    log(f"preparing data in {directory} (runs once; later runs reuse it)")
    (staging / PARTITIONS).mkdir(parents=True)
    write_atomically(staging / RECIPE, json.dumps({"recipe": recipe}) + "\n")
    return staging


def tokenizer_step(staging: Path, data: DataConfig, vocab_size: int) -> None:
    """The tokenizer every partition uses: trained once (on a bounded sample, the same whatever does the work) or
    copied from data.tokenizer (checked first), and kept in the staging folder."""
    path = staging / "tokenizer.json"
    if path.exists():
        return
    if data.tokenizer:
        load_tokenizer(data.tokenizer, vocab_size)
        write_atomically(path, Path(data.tokenizer).read_bytes())
    else:
        tokenizer = train_bpe(tokenizer_sample(data), vocab_size)
        write_atomically(path, lambda partial: tokenizer.save(str(partial)))


def storage_dtype(tokenizer) -> str:
    return "uint16" if id_bound(tokenizer) <= 2**16 else "uint32"


def write_manifest(staging: Path, data: DataConfig, recipe: str, tokenizer, dtype: str, log) -> None:
    shards = merge(staging, data, dtype)
    meta = {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "dtype": dtype,
        "block_tokens": data.block_tokens,
        "end_of_document_id": tokenizer.token_to_id(END_OF_DOCUMENT),
        "tokenizer_sha256": file_sha256(staging / "tokenizer.json"),
        "tokenizer_vocab_size": id_bound(tokenizer),  # every stored id is below it
        "sources": [{**source.model_dump(mode="json"), "description": describe(source)} for source in data.sources],
        "splits": {split: [shard.__dict__ for shard in split_shards] for split, split_shards in shards.items()},
    }
    # The fingerprint covers the tokenizer, every shard's bytes and the mixture: it seeds the data order.
    meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    write_atomically(staging / MANIFEST, json.dumps(meta, indent=2) + "\n")
    counts = {split: sum(s.tokens for s in split_shards) for split, split_shards in shards.items()}
    log(
        f"prepared {counts['train']:,} training and {counts['val']:,} validation tokens (stored) in"
        f" {sum(map(len, shards.values()))} shards ({id_bound(tokenizer)} token vocabulary)"
    )


@contextmanager
def exclusive(lock_path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold the file lock at `lock_path`, calling `on_wait` first if another process holds it."""
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
