"""Checking a prepared dataset's local shards against its manifest before training, and remembering what passed.

`verified.json`, beside the manifest, lists each shard that passed with the stamp it had then: size, modification
time, inode number and change time. The first two a user can set back (`cp -p`, `rsync -a`, `touch -r`); the
last two the kernel sets, and any write, copy over or replacement of the file changes them. A shard whose stamp
is unchanged is not hashed again, so a requeued job or a resumed run starts without reading the corpus. The
record is saved as the check goes (every `save_every` shards hashed, and when it stops on an error), so a start
stopped after hours of hashing keeps what it checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.common.errors import DataError
from data_pipeline.common.files import write_atomically
from data_pipeline.manifest import Manifest, Shard
from data_pipeline.shard_reader import is_local, refuse_if_damaged, shard_location
from data_pipeline.tokenizer import file_sha256

VERIFIED_RECORD = "verified.json"
# Shards of 256 MiB hash in about a minute per 256 at disk speed: what a stopped start loses at most.
SAVE_EVERY_HASHED = 256


def verify_shards(manifest: Manifest, shard_url: str | None, save_every: int = SAVE_EVERY_HASHED) -> None:
    """Check that every local shard exists with the sha256 the manifest records (remote ones: on read). A shard
    checked before and unchanged since (the same stamp, the same manifest) is not hashed again."""
    if file_sha256(manifest.tokenizer_path) != manifest.tokenizer_sha256:
        raise DataError(
            f"{manifest.dir / 'manifest.json'}: was written for another tokenizer than"
            f" {manifest.tokenizer_path}; prepare the data again"
        )
    record_path = manifest.dir / VERIFIED_RECORD
    checked = read_verified(record_path, manifest.fingerprint)
    unsaved = 0
    try:
        for location, shard in local_shards(manifest, shard_url):
            stamp = file_stamp(location)  # before hashing: a change while it is read shows at the next start
            if checked.get(location) == stamp:
                continue
            checked.pop(location, None)
            # Streamed: shards can be larger than memory allows twice over.
            refuse_if_damaged(location, shard, file_sha256(location))
            checked[location] = stamp
            unsaved += 1
            if unsaved >= save_every:
                save_verified(record_path, manifest.fingerprint, checked)
                unsaved = 0
    finally:
        if unsaved:
            save_verified(record_path, manifest.fingerprint, checked)


def local_shards(manifest: Manifest, shard_url: str | None) -> Iterator[tuple[str, Shard]]:
    for split in manifest.splits.values():
        for shard in split:
            location = shard_location(manifest, shard, shard_url)
            if is_local(location):
                yield location, shard


def file_stamp(location: str) -> list[int]:
    """What a verification record keeps of a shard: its size and modification time, which a copy can carry over,
    and its inode number and change time, which nothing but the kernel sets."""
    try:
        status = os.stat(location)
    except FileNotFoundError:
        raise DataError(f"{location}: shard missing; restore it or prepare the data again") from None
    return [status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns]


def save_verified(record_path: Path, fingerprint: str, checked: dict[str, list[int]]) -> None:
    try:
        write_atomically(record_path, json.dumps({"fingerprint": fingerprint, "shards": checked}) + "\n")
    except OSError:  # a corpus on a read-only mount: checked again at the next start
        pass


def read_verified(record_path: Path, fingerprint: str) -> dict[str, list[int]]:
    """The shards a verification record lists, if it was written for this manifest; {} otherwise."""
    try:
        record = json.loads(record_path.read_text())
        return dict(record["shards"]) if record["fingerprint"] == fingerprint else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
