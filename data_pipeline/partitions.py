"""Preparing a corpus in partitions, so that any number of workers (processes, SLURM tasks, nodes) can share the
work and the result does not depend on how many did.

The units of the sources (files, parquet row groups, generated sources) are dealt to `data.partitions`
partitions in turn. A worker takes a whole partition: it tokenizes the partition's documents, packs each
split's token stream into blocks and writes the full blocks as the partition's own shards; what is left over
(less than a block) is kept as the partition's tail. The tasks of a job on many nodes do not divide the
partitions among them in advance: each claims the next unclaimed one whenever it has a worker free, so a task
that starts late (a busy cluster), runs on a slow node or draws large partitions leaves the rest to the
others. A partition is written under a temporary name, locked while its worker lives, and renamed
into `partitions/PPPPP/` with its record, so one that is there is whole: a rerun skips it. The last step
(`merge`) packs the tails, in partition order, into the closing shards of each split and gathers every
partition's shards into one list, so that every block but the split's very last is full, as the loader expects.
A merge killed part way is finished by running it again.

Block i of one partition's split holds tokens [i*B, i*B + B] of that partition's token stream (B =
data.block_tokens): one token of overlap, so windows of seq_len + 1 tokens tile the stream exactly when
seq_len divides B.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from data_pipeline.common.errors import DataError
from data_pipeline.common.files import fsync_directory, publish_directory
from data_pipeline.config import DataConfig
from data_pipeline.manifest import SPLITS, Shard, shard_pattern
from data_pipeline.sources import Unit, all_units, describe, is_validation, unit_group_documents
from data_pipeline.tokenizer import END_OF_DOCUMENT, file_sha256, load_tokenizer

PARTITIONS = "partitions"
RECORD = "partition.json"
WRITING = ".writing"  # the lock a worker holds on its partition's temporary folder
CHUNK_CHARS = 1 << 20  # text tokenized at a time


def plan(data: DataConfig) -> list[list[Unit]]:
    """The units of each partition: every source's units in order, dealt to the partitions in turn."""
    units = all_units(data)
    return [units[partition :: data.partitions] for partition in range(data.partitions)]


@dataclass(frozen=True)
class PartitionRecord:
    """What a finished partition wrote: each split's shards, and whether its tail begins with the last token of
    the partition's last block (the overlap a block carries); the documents it read from each source; and the
    size of each file in its folder."""

    shards: dict[str, list[Shard]]
    tail_overlaps: dict[str, bool]
    documents: dict[int, int]
    sizes: dict[str, int]

    @classmethod
    def load(cls, path: Path) -> PartitionRecord:
        record = json.loads(path.read_text())
        return cls({split: [Shard(**shard) for shard in shards] for split, shards in record["shards"].items()},
                   record["tail_overlaps"], {int(source): count for source, count in record["documents"].items()},
                   record["sizes"])


def partition_dir(staging: Path, partition: int) -> Path:
    return staging / PARTITIONS / f"{partition:05d}"


@dataclass(frozen=True)
class Claims:
    """The partitions the tasks of one job have taken: a symbolic link per partition, pointing at the name of
    whichever task took it first. Creating one is exclusive and atomic, also on a shared filesystem, and sets its
    target in the same step: no task can die between taking a partition and saying whose it is. A task requeued
    after a lost node finds its own claims and takes them again; a later job claims in a folder of its own."""

    directory: Path
    owner: str

    def take(self, partition: int) -> bool:
        path = self.directory / f"{partition:05d}"
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(self.owner, path)
        except FileExistsError:
            return os.readlink(path) == self.owner
        return True


def is_done(staging: Path, partition: int) -> bool:
    """Whether a partition is whole: its record is there and each file it lists has the size it was written
    with (a partition is renamed into place whole, so this guards against what happened to it since), in its
    folder or, for a shard that a merge has gathered already, in `staging`."""
    directory = partition_dir(staging, partition)
    try:
        record = PartitionRecord.load(directory / RECORD)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    shards = {shard.name for split_shards in record.shards.values() for shard in split_shards}
    # The folder first: a shard the merge moves in between is then found in `staging`.
    return all(has_size(directory / name, size) or (name in shards and has_size(staging / name, size))
               for name, size in record.sizes.items())


def has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


@contextmanager
def being_written(work: Path) -> Iterator[None]:
    """Hold the lock of a partition's temporary folder while the block runs; the system releases it when the
    worker dies, however it dies, so that clear_abandoned knows the folder is no one's. The lock file is created
    under another name and renamed once held: no sweep finds it free in between."""
    fresh = work / f"{WRITING}.new"
    descriptor = os.open(fresh, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(fresh, work / WRITING)
        yield
    finally:
        os.close(descriptor)


def clear_abandoned(staging: Path) -> None:
    """Remove the temporary folders that dead workers left, here or on other nodes. A folder whose lock is held is
    being written (by a task of a job still running); one without a lock yet is being set up."""
    # fcntl rather than filelock: a lock that is not there must not be created.
    for folder in (staging / PARTITIONS).glob(".*.tmp-*"):
        try:
            descriptor = os.open(folder / WRITING, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
        except BlockingIOError:
            pass
        finally:
            os.close(descriptor)


class ShardedSplit:
    """Packs one split's token stream into blocks and writes the full ones as webdataset shards."""

    def __init__(self, directory: Path, pattern: str, dtype: str, block_tokens: int, shard_bytes: int):
        self.directory = directory
        self.pattern = pattern
        self.stored_dtype = np.dtype(dtype).newbyteorder("<")
        self.block_tokens = block_tokens
        self.shard_bytes = shard_bytes
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.samples = 0
        self.shards: list[Shard] = []
        self._shard_start = (0, 0)  # (samples, tokens) written before the current shard
        self.tokens_written = 0
        self.writer = None  # opened at the first block: a partition may hold none of a split

    def _shard_done(self, path: str) -> None:
        samples, tokens = self._shard_start
        self.shards.append(Shard(Path(path).name, self.samples - samples, self.tokens_written - tokens,
                                 file_sha256(path), os.path.getsize(path)))
        self._shard_start = (self.samples, self.tokens_written)

    def _write(self, block: np.ndarray) -> None:
        if self.writer is None:
            import webdataset  # deferred: only preparing and reading shards need it

            # mtime=0 and a fixed owner make the tar bytes depend on the tokens alone.
            self.writer = webdataset.ShardWriter(
                str(self.directory / self.pattern), maxsize=self.shard_bytes, maxcount=2**31, verbose=0,
                post=self._shard_done, mtime=0,
            )
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

    def close(self, write_rest: bool) -> np.ndarray:
        """Finish the shards; the tokens after the last full block are written as a last, short block
        (`write_rest`) or returned."""
        rest = np.concatenate(self.pending) if self.pending else np.empty(0, self.stored_dtype)
        if write_rest and len(rest) > 1:
            self._write(rest)
            rest = rest[:0]
        if self.writer is not None:
            self.writer.close()
        return rest.astype(self.stored_dtype)


# The tokenizer of a worker process, loaded once by start_worker.
_tokenizer = None


def start_worker(tokenizer_path: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the processes are the parallelism
    _tokenizer = load_tokenizer(tokenizer_path, max_vocab_size=2**32)


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


def counted(units: list[Unit], documents: dict[int, int], data: DataConfig) -> Iterator[str]:
    """The partition's weighted documents, counting each source's as they pass."""
    for source, text in unit_group_documents(data.sources, units):
        documents[source] = documents.get(source, 0) + 1
        yield text


def write_partition(staging: Path, data: DataConfig, dtype: str, partition: int, units: list[Unit]) -> int:
    """Tokenize and shard one partition (in a process started by start_worker); returns the bytes of text read."""
    final = partition_dir(staging, partition)
    work = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)  # left by a dead process that had this one's id
    work.mkdir(parents=True)
    with being_written(work):
        text_bytes = write_partition_files(work, data, dtype, partition, units)
        publish_partition(staging, partition, work)
    return text_bytes


def write_partition_files(work: Path, data: DataConfig, dtype: str, partition: int, units: list[Unit]) -> int:
    end_of_document = _tokenizer.token_to_id(END_OF_DOCUMENT)
    splits = {split: ShardedSplit(work, shard_pattern(split, partition), dtype, data.block_tokens, data.shard_bytes)
              for split in SPLITS}
    documents: dict[int, int] = {}
    text_bytes = 0
    for chunk in text_chunks(counted(units, documents, data)):
        text_bytes += sum(len(text.encode()) for text in chunk)
        ids = {split: [] for split in SPLITS}
        for text, encoding in zip(chunk, _tokenizer.encode_batch_fast(chunk, add_special_tokens=False)):
            ids["val" if is_validation(text, data.val_fraction) else "train"].append((*encoding.ids, end_of_document))
        for split, parts in ids.items():
            if parts:
                splits[split].add(np.fromiter(chain.from_iterable(parts), dtype=dtype))
    tails = {split: writer.close(write_rest=False) for split, writer in splits.items()}
    for split, tail in tails.items():
        (work / f"{split}.tail").write_bytes(tail.tobytes())
    record = {
        "shards": {split: [asdict(shard) for shard in writer.shards] for split, writer in splits.items()},
        "tail_overlaps": {split: writer.samples > 0 for split, writer in splits.items()},
        "documents": documents,
        "sizes": {path.name: path.stat().st_size for path in work.iterdir() if path.name != WRITING},
    }
    (work / RECORD).write_text(json.dumps(record) + "\n")
    return text_bytes


def publish_partition(staging: Path, partition: int, work: Path) -> None:
    """Rename a written partition into place, over a copy there that is not whole (a file of it changed since it
    was written); a whole one there (another worker's, with the same bytes) is kept and this one dropped."""
    final = partition_dir(staging, partition)
    damaged = work.with_name(f"{work.name}.damaged")
    while not is_done(staging, partition):
        try:
            publish_directory(work, final)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        with suppress(FileNotFoundError):  # another worker moved it away first
            final.rename(damaged)
        shutil.rmtree(damaged, ignore_errors=True)
    shutil.rmtree(work)


def merge(staging: Path, data: DataConfig, dtype: str) -> dict[str, list[Shard]]:
    """Gather every partition's shards into `staging` and write the tails as each split's closing shards, durably;
    returns each split's shards in order. Every partition must be done. The partitions are kept, so a merge killed
    part way is finished by merging again."""
    records = [PartitionRecord.load(partition_dir(staging, p) / RECORD) for p in range(data.partitions)]
    for index, source in enumerate(data.sources):
        if not any(record.documents.get(index) for record in records):
            raise DataError(f"{describe(source)}: the {source.kind} source gave no documents; remove it or fix its"
                            " files")
    shards = {}
    for split in SPLITS:
        closing = ShardedSplit(staging, shard_pattern(split, data.partitions), dtype, data.block_tokens,
                               data.shard_bytes)
        for partition, record in enumerate(records):
            tail = np.fromfile(partition_dir(staging, partition) / f"{split}.tail", dtype=closing.stored_dtype)
            # A tail that repeats its partition's last block's final token drops it: that token is stored already.
            closing.add(tail[1:] if record.tail_overlaps[split] else tail)
            for shard in record.shards[split]:
                written = partition_dir(staging, partition) / shard.name
                if written.exists():  # else gathered by a merge that was killed (is_done found it whole)
                    os.replace(written, staging / shard.name)
        closing.close(write_rest=True)
        for shard in closing.shards:  # on disk before the manifest that says the merge is done
            with open(staging / shard.name, "rb") as file:
                os.fsync(file.fileno())
        shards[split] = [shard for record in records for shard in record.shards[split]] + closing.shards
        if not shards[split]:
            raise DataError(f"the {split} split is empty; add sources or adjust data.val_fraction")
    fsync_directory(staging)  # the shards gathered into it
    return shards

