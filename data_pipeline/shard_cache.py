"""A directory of fetched shards (`data.shard_cache`), named by their sha256 and shared by every process that
reads through it: the ranks of a job, their loader workers, other jobs on the machine or the shared filesystem.

What it holds, all named by the shard's sha256 (checked to be 64 hex digits before it names any file):
  <sha256>.tar                 a shard whose bytes were checked against the manifest;
  <sha256>.verified            the (size, mtime_ns, inode, ctime_ns) that file had when it was last hashed and
                               found right; its own modification time says when the shard was last used;
  .<sha256>.<pid>@<host>.part  a transfer under way, locked (flock) by its writer while it lives; once the
                               lock is free (the kernel drops a killed writer's locks), deleted by the next
                               eviction;
  .lock                        taken (flock) while a shard is added and the cache made to fit its bound.

A file whose status differs from its record (rewritten, flipped in place, replaced) is hashed before it is used
again, and fetched anew if it is wrong. Another process may evict a shard at any moment: a reader holds the file
open (an unlinked file keeps its bytes until closed), and a shard gone before it was opened is a miss, fetched
again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_pipeline.common.errors import DataError
from data_pipeline.common.files import fsync_directory, write_atomically
from data_pipeline.manifest import Shard

HASH_CHUNK_BYTES = 1 << 20
LOCK = ".lock"
SHA256 = re.compile(r"[0-9a-f]{64}")
PART = re.compile(r"\.[0-9a-f]{64}\.\d+@.+\.part")
# What a process killed while writing a record leaves (write_atomically's name); the write takes milliseconds.
PARTIAL_RECORD = re.compile(r"\.[0-9a-f]{64}\.verified\.partial-\d+")
ABANDONED_RECORD_SECONDS = 3600


def checked_sha256(location: str, shard: Shard) -> str:
    """The shard's sha256 as the manifest records it, if it is one: it names files, so "../../x" must not."""
    if not SHA256.fullmatch(shard.sha256):
        raise DataError(
            f"{location}: the manifest records sha256 {shard.sha256[:80]!r} for {shard.name}, not 64 lowercase hex"
            " digits; the manifest was edited or damaged: prepare the data again"
        )
    return shard.sha256


def part_name(sha256: str) -> str:
    """A partial file's name, unique to the process (on any host) that writes it."""
    return f".{sha256}.{os.getpid()}@{socket.gethostname()}.part"


def locked_part(path: Path) -> BinaryIO:
    """A new, empty partial file, locked for as long as it is open: an eviction deletes only partial files whose
    lock it can take (their writer is gone, however long ago it last wrote)."""
    while True:
        file = open(path, "w+b")
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                return file
        except FileNotFoundError:
            pass
        file.close()  # an eviction deleted the file between its creation and its lock: make it again


def file_status(file: BinaryIO) -> list[int]:
    """What a cached file's record holds: any write to the file, or a new file in its place, changes it."""
    status = os.fstat(file.fileno())
    return [status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns]


@dataclass(frozen=True)
class ShardCache:
    directory: Path
    max_bytes: int
    # data.verify=on_read: hash a shard each time it is opened, even when its record vouches for it (damage in
    # place that leaves the file's status alone, such as bit rot, is caught too).
    hash_every_hit: bool = False

    def open_cached(self, sha256: str) -> BinaryIO | None:
        """The cached shard, open, if it is here with the right bytes; None (a miss: fetch it) otherwise."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            file = open(self.directory / f"{sha256}.tar", "rb")
        except FileNotFoundError:  # never fetched, or evicted by another process since it was looked for
            return None
        status = file_status(file)
        record = self._record_path(sha256)
        recorded = self._recorded(record)
        if self.hash_every_hit or recorded != status:
            if _sha256(file) != sha256:
                file.close()
                return None  # fetched again, and put in its place
            if recorded != status:
                self.record_verified(sha256, status)
        try:
            os.utime(record)  # recently used: evicted last
        except FileNotFoundError:  # evicted meanwhile; the open file is still whole
            pass
        file.seek(0)
        return file

    def add(self, part: Path, sha256: str) -> BinaryIO:
        """Put a fetched and checked shard in the cache (durably: renamed only once its bytes are on disk), make
        the cache fit its bound, and return the shard open."""
        file = open(part, "rb")  # open before the rename: another process may evict it at once
        os.fsync(file.fileno())
        with self._locked():
            os.replace(part, self.directory / f"{sha256}.tar")
            fsync_directory(self.directory)
            self.record_verified(sha256, file_status(file))
            self._evict(keep=sha256)
        return file

    def record_verified(self, sha256: str, status: list[int]) -> None:
        """Note that the cached shard with this status was hashed and found right."""
        write_atomically(self._record_path(sha256), json.dumps(status))

    def _record_path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.verified"

    @staticmethod
    def _recorded(record: Path) -> list[int] | None:
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError):  # none yet, or evicted: the file is hashed
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _evict(self, keep: str) -> None:
        """Delete abandoned partial files, then the least recently used shards until the cache, partial files of
        transfers under way included, holds at most max_bytes. Only files of the names above are touched."""
        shards, total = [], 0
        for path in self.directory.iterdir():
            try:
                status = path.stat()
            except FileNotFoundError:  # a partial file that its writer finished or gave up meanwhile
                continue
            if path.suffix == ".tar" and SHA256.fullmatch(path.stem):
                try:
                    last_used = self._record_path(path.stem).stat().st_mtime
                except FileNotFoundError:
                    last_used = status.st_mtime
                shards.append((last_used, status.st_size, path))
                total += status.st_size
            elif path.suffix == ".verified" and SHA256.fullmatch(path.stem):
                if not path.with_suffix(".tar").exists():  # its shard was evicted while it was being hashed
                    path.unlink(missing_ok=True)
            elif PART.fullmatch(path.name) or PARTIAL_RECORD.fullmatch(path.name):
                if not self._deleted_if_abandoned(path, status.st_mtime):
                    total += status.st_size
        for _, size, path in sorted(shards):
            if total <= self.max_bytes:
                break
            if path.stem != keep:
                total -= size
                path.unlink(missing_ok=True)
                self._record_path(path.stem).unlink(missing_ok=True)

    @staticmethod
    def _deleted_if_abandoned(path: Path, modified: float) -> bool:
        if PARTIAL_RECORD.fullmatch(path.name):
            if time.time() - modified < ABANDONED_RECORD_SECONDS:
                return False
            path.unlink(missing_ok=True)
            return True
        try:
            with open(path, "rb") as file:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Unlinked while locked, and only if the name is still that file's: a writer that locks it next
                # sees it gone (locked_part), and a new transfer under the same name keeps its file.
                if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                    path.unlink()
                    return True
                return False
        except BlockingIOError:  # its writer is alive
            return False
        except FileNotFoundError:  # finished meanwhile
            return True


def _sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    file.seek(0)
    while chunk := file.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()
