"""Prepare a dataset once: sources -> tokenizer -> tokens (in parallel) -> packed blocks -> tar shards.

`data.dir` then holds:
    tokenizer.json            the byte-level BPE (trained here, or a copy of the given one)
    train-000000.tar ...      webdataset shards; each sample is one block of tokens (`<key>.tokens`, raw
    val-000000.tar ...        little-endian uint16 or uint32); documents end with the end-of-document token
    manifest.json             shards with their samples, tokens and sha256, the tokenizer's hash, the
                              source mixture, and a fingerprint of all of it

Block i of a split holds tokens [i*B, i*B + B] of the split's token stream (B = data.block_tokens): one
token of overlap, so windows of seq_len + 1 tokens tile the stream exactly when seq_len divides B.

The directory is written under a temporary name and renamed into place: a crash never leaves a half-written
dataset, and an existing dataset made from a different recipe is refused, never overwritten. Results come
back from the tokenizer processes in order, so the shards are byte-identical whatever the number of them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.files import publish_directory
from data_pipeline.sources import describe, text_hash, weighted_documents
from data_pipeline.tokenizer import (
    END_OF_DOCUMENT,
    file_sha256,
    id_bound,
    load_tokenizer,
    train_bpe,
)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 20  # text handed to a tokenizer process at a time


@dataclass(frozen=True)
class Shard:
    name: str
    samples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset, as described by its manifest.json."""

    dir: Path
    recipe: str
    fingerprint: str
    dtype: str
    block_tokens: int
    end_of_document_id: int
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    splits: dict[str, list[Shard]]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            meta = json.loads(path.read_text())
            return cls(
                dir=directory,
                recipe=meta["recipe"],
                fingerprint=meta["fingerprint"],
                dtype=meta["dtype"],
                block_tokens=meta["block_tokens"],
                end_of_document_id=meta["end_of_document_id"],
                tokenizer_sha256=meta["tokenizer_sha256"],
                tokenizer_vocab_size=meta["tokenizer_vocab_size"],
                splits={split: [checked_shard(path, split, shard) for shard in meta["splits"][split]]
                        for split in SPLITS},
            )
        except FileNotFoundError:
            raise DataError(
                f"{path}: not found; run `python -m launch prepare --config CONFIG` (make data) to create it"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not a manifest this version can read ({error}); prepare the data again") from None


def checked_shard(manifest: Path, split: str, recorded: dict) -> Shard:
    """A shard as the manifest records it, whose name is one this project writes: a name reaches a URL template
    and, with a `pipe:` shard_url, a shell command, so a tampered manifest must not choose it."""
    shard = Shard(**recorded)
    if not re.fullmatch(rf"{split}-\d{{6}}\.tar", shard.name):
        raise DataError(
            f"{manifest}: shard name {shard.name!r} is not one `prepare` writes ({split}-NNNNNN.tar); the manifest"
            " was edited or damaged: prepare the data again"
        )
    return shard


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
        "python": sys.version_info[:2],  # the stdlib docstrings differ between Python versions
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def is_validation(text: str, val_fraction: float) -> bool:
    # By a hash of the text, not its position: adding a source never moves another's documents between splits.
    return text_hash(text) < val_fraction * 2**32


def all_documents(data: DataConfig) -> Iterator[str]:
    """Every source's weighted documents, interleaved one by one, so that any stretch of the token stream
    (and so any shuffle window of the loader) mixes the sources rather than holding one of them."""
    streams = [weighted_documents(source) for source in data.sources]
    while streams:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
            else:
                yield text


def tokenizer_sample(data: DataConfig) -> Iterator[str]:
    """Training documents for the BPE, from all sources, up to tokenizer_sample_bytes."""
    budget = data.tokenizer_sample_bytes
    for text in all_documents(data):
        if budget <= 0:
            return
        if not is_validation(text, data.val_fraction):
            budget -= len(text.encode())
            yield text


def text_chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# State of a tokenizer process, set once by _start_tokenizer_process.
_tokenizer = None
_split_settings: tuple[float, int, str] | None = None


def _start_tokenizer_process(tokenizer_path: str, val_fraction: float, dtype: str) -> None:
    global _tokenizer, _split_settings
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the processes are the parallelism
    _tokenizer = load_tokenizer(tokenizer_path, max_vocab_size=2**32)
    _split_settings = (val_fraction, _tokenizer.token_to_id(END_OF_DOCUMENT), dtype)


def _tokenize_chunk(chunk: list[str]) -> tuple[int, dict[str, np.ndarray]]:
    """Token streams of one chunk of documents, per split, each document followed by the end-of-document id."""
    val_fraction, end_of_document_id, dtype = _split_settings
    ids = {split: [] for split in SPLITS}
    for text, encoding in zip(chunk, _tokenizer.encode_batch_fast(chunk, add_special_tokens=False)):
        split_ids = ids["val" if is_validation(text, val_fraction) else "train"]
        split_ids.append(encoding.ids)
        split_ids.append((end_of_document_id,))
    byte_count = sum(len(text.encode()) for text in chunk)
    return byte_count, {split: np.fromiter(chain.from_iterable(parts), dtype=dtype) for split, parts in ids.items()}


class ShardedSplit:
    """Packs one split's token stream into blocks and writes them as webdataset shards."""

    def __init__(self, directory: Path, split: str, dtype: str, block_tokens: int, shard_bytes: int):
        import webdataset  # deferred: only preparing and reading shards need it

        self.split = split
        self.stored_dtype = np.dtype(dtype).newbyteorder("<")
        self.block_tokens = block_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.samples = 0
        self.shards: list[Shard] = []
        self._shard_start = (0, 0)  # (samples, tokens) written before the current shard
        self.tokens_written = 0
        # mtime=0 and fixed owner make the tar bytes depend on the tokens alone: re-running gives identical shards.
        self.writer = webdataset.ShardWriter(
            str(directory / f"{split}-%06d.tar"), maxsize=shard_bytes, maxcount=2**31, verbose=0,
            post=self._shard_done, mtime=0,
        )

    def _shard_done(self, path: str) -> None:
        samples, tokens = self._shard_start
        self.shards.append(
            Shard(Path(path).name, self.samples - samples, self.tokens_written - tokens, file_sha256(path))
        )
        self._shard_start = (self.samples, self.tokens_written)

    def _write(self, block: np.ndarray) -> None:
        self.writer.write({"__key__": f"{self.samples:010d}", "tokens": block.astype(self.stored_dtype).tobytes()})
        self.samples += 1
        self.tokens_written += len(block)

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens <= self.block_tokens:
            return
        stream = np.concatenate(self.pending)
        full_blocks = (len(stream) - 1) // self.block_tokens
        for block in range(full_blocks):
            start = block * self.block_tokens
            self._write(stream[start : start + self.block_tokens + 1])
        rest = stream[full_blocks * self.block_tokens :]  # starts with the last block's final token
        self.pending, self.pending_tokens = [rest], len(rest)

    def close(self) -> list[Shard]:
        if self.pending_tokens > 1:
            self._write(np.concatenate(self.pending))
        self.writer.close()
        if self.samples == 0:
            raise DataError(f"the {self.split} split is empty; add sources or adjust data.val_fraction")
        return self.shards


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


def prepare(data: DataConfig, vocab_size: int, log=print) -> Manifest:
    """Prepare `data.dir` if needed and return its manifest. Reuses a directory prepared from the same recipe."""
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
        # Under the lock, a staging folder is what a killed preparation left: cleared, never reused.
        for orphan in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        log(f"preparing data in {directory} (runs once; later runs reuse it)")
        staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        staging.mkdir()
        try:
            _prepare_into(staging, data, vocab_size, recipe, log)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish_directory(staging, directory)  # durable before anyone reads it, whole or not at all
    return Manifest.load(directory)


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


def _prepare_into(staging: Path, data: DataConfig, vocab_size: int, recipe: str, log) -> None:
    tokenizer_path = staging / "tokenizer.json"
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer, vocab_size)
        shutil.copyfile(data.tokenizer, tokenizer_path)
    else:
        tokenizer = train_bpe(tokenizer_sample(data), vocab_size)
        tokenizer.save(str(tokenizer_path))
    dtype = "uint16" if id_bound(tokenizer) <= 2**16 else "uint32"

    workers = data.workers or os.cpu_count() or 1
    splits = {split: ShardedSplit(staging, split, dtype, data.block_tokens, data.shard_bytes) for split in SPLITS}
    context = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads
    with context.Pool(workers, _start_tokenizer_process, (str(tokenizer_path), data.val_fraction, dtype)) as pool, \
            tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=None) as progress:
        for byte_count, streams in pool.imap(_tokenize_chunk, text_chunks(all_documents(data))):
            for split, tokens in streams.items():
                if len(tokens):
                    splits[split].add(tokens)
            progress.update(byte_count)
    shards = {split: writer.close() for split, writer in splits.items()}

    tokenizer_sha256 = file_sha256(tokenizer_path)
    meta = {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "dtype": dtype,
        "block_tokens": data.block_tokens,
        "end_of_document_id": tokenizer.token_to_id(END_OF_DOCUMENT),
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_vocab_size": id_bound(tokenizer),  # every stored id is below it
        "sources": [{**source.model_dump(mode="json"), "description": describe(source)} for source in data.sources],
        "splits": {split: [shard.__dict__ for shard in split_shards] for split, split_shards in shards.items()},
    }
    # The fingerprint covers the tokenizer, every shard's bytes and the mixture: it seeds the data order.
    meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    (staging / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    counts = {split: sum(s.tokens for s in split_shards) for split, split_shards in shards.items()}
    log(
        f"prepared {counts['train']:,} training and {counts['val']:,} validation tokens (stored) in"
        f" {sum(map(len, shards.values()))} shards ({id_bound(tokenizer)} token vocabulary)"
    )
