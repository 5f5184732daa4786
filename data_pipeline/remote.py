"""Shards behind a URL (http(s), `pipe:` commands, anything webdataset's gopen opens): fetched as a stream into a
local file, never whole into memory, with the size and sha256 the manifest records checked as the bytes arrive.

A transfer that fails (a timeout, a dropped connection, an HTTP 5xx or 429, a command that exits non-zero) is
tried again after a growing pause, up to `data.fetch_retries` times; over HTTP it resumes where it stopped with
a range request when the server allows one. A shard the server does not have (HTTP 404, 410) stops at once.
Fetched shards live in `data.shard_cache` (kept up to `data.shard_cache_bytes`, oldest first out) or, without
one, in temporary files that are unlinked as soon as they are open, so nothing is left behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import Shard

CHUNK_BYTES = 1 << 20
GONE = (403, 404, 410)  # the server will not have it however often it is asked
FIRST_PAUSE_SECONDS = 0.2


def redacted(location: str) -> str:
    """A location fit for a message or a log: no user:password@ and no query string (signed URLs carry keys)."""
    parts = urllib.parse.urlsplit(location)
    if not parts.scheme or parts.scheme == "pipe":
        return location
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


class TransientError(Exception):
    """A failure that another try may not meet."""


@dataclass(frozen=True)
class Fetcher:
    timeout_seconds: float = 60.0
    retries: int = 5
    cache_dir: Path | None = None
    cache_bytes: int = 0

    @classmethod
    def from_config(cls, data: DataConfig) -> Fetcher:
        cache = Path(data.shard_cache) if data.shard_cache else None
        return cls(data.fetch_timeout_seconds, data.fetch_retries, cache, data.shard_cache_bytes)

    def open(self, location: str, shard: Shard):
        """An open binary file holding the shard, checked against the manifest."""
        directory = self.cache_dir or Path(tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        cached = directory / f"{shard.sha256}.tar"  # named by content: shared safely by runs and datasets
        if self.cache_dir and cached.is_file() and cached.stat().st_size == shard.bytes:
            os.utime(cached)  # recently used: evicted last
            return open(cached, "rb")
        path = self._fetch(location, shard, directory)
        if self.cache_dir is None:
            file = open(path, "rb")
            path.unlink()  # the open file keeps the bytes until it is closed; nothing outlives this process
            return file
        os.replace(path, cached)
        self._evict(keep=cached)
        return open(cached, "rb")

    def _fetch(self, location: str, shard: Shard, directory: Path) -> Path:
        transfer = _Transfer(directory / f".{shard.sha256}.{os.getpid()}.part")
        last_error = None
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(min(FIRST_PAUSE_SECONDS * 2 ** (attempt - 1), 30.0))
                try:
                    if location.startswith(("http://", "https://")):
                        self._http(location, transfer)
                    else:
                        self._stream(location, transfer)
                    break
                except TransientError as error:
                    last_error = error
            else:
                raise DataError(f"{redacted(location)}: not fetched after {self.retries + 1} tries ({last_error});"
                                " check the server or the command, or raise data.fetch_retries")
            if (actual := transfer.digest.hexdigest()) != shard.sha256 or transfer.received != shard.bytes:
                raise DataError(
                    f"{redacted(location)}: sha256 differs from the manifest's ({actual[:16]}..., not"
                    f" {shard.sha256[:16]}...; {transfer.received:,} bytes, not {shard.bytes:,}); the shard is damaged"
                    " or from another preparation: prepare the data again"
                )
        except BaseException:
            transfer.path.unlink(missing_ok=True)
            raise
        return transfer.path

    def _http(self, url: str, transfer: _Transfer) -> None:
        request = urllib.request.Request(url, headers={"Range": f"bytes={transfer.received}-"} if transfer.received
                                         else {})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_seconds)
        except urllib.error.HTTPError as error:
            if error.code in GONE:
                raise DataError(f"{redacted(url)}: the server does not have this shard (HTTP {error.code}); restore"
                                " it there, or point data.shard_url at where the shards are") from None
            raise TransientError(f"HTTP {error.code}") from None
        except (urllib.error.URLError, OSError) as error:
            raise TransientError(str(getattr(error, "reason", error))) from None
        with response:
            if transfer.received and response.status != 206:  # the server ignored the range: from the start
                transfer.restart()
            try:
                transfer.copy(response)
            except (OSError, http.client.HTTPException) as error:
                # What arrived is kept: the next try asks for the rest.
                raise TransientError(f"cut after {transfer.received:,} bytes: {error}") from None

    def _stream(self, location: str, transfer: _Transfer) -> None:
        import webdataset  # deferred: only shards behind a command or another scheme need it

        transfer.restart()  # a command cannot resume
        try:
            with webdataset.gopen(location, "rb") as stream:
                transfer.copy(stream)
        except Exception as error:  # gopen raises what the command or scheme raised, or a failed exit status
            raise TransientError(str(error)) from None

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used shards of the cache until it holds at most cache_bytes."""
        shards = sorted(self.cache_dir.glob("*.tar"), key=lambda path: path.stat().st_mtime)
        total = sum(path.stat().st_size for path in shards)
        for path in shards:
            if total <= self.cache_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


class _Transfer:
    """The bytes of one shard received so far, in a partial file, and their running sha256."""

    def __init__(self, path: Path):
        self.path = path
        self.restart()

    def restart(self) -> None:
        self.digest, self.received = hashlib.sha256(), 0
        self.path.write_bytes(b"")

    def copy(self, stream) -> None:
        # read1: what has arrived, at most one wait; so that bytes received before a connection drops are kept.
        read = getattr(stream, "read1", stream.read)
        with open(self.path, "ab") as file:
            while chunk := read(CHUNK_BYTES):
                file.write(chunk)
                self.digest.update(chunk)
                self.received += len(chunk)
