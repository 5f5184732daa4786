"""Shards behind a URL (http(s), `pipe:` commands, anything else webdataset's gopen opens): fetched as a stream into
a local file, never whole into memory, with the size and sha256 the manifest records checked as the bytes arrive.

A transfer that fails (a timeout, a dropped connection, an HTTP 5xx or 429, a command that exits non-zero, a try
that outlives `data.fetch_deadline_seconds`) is tried again after a growing pause, up to `data.fetch_retries`
times; over HTTP it resumes where it stopped with a range request when the server allows one. A shard the server
does not have (HTTP 403, 404, 410), or that arrives with other bytes than the manifest's (a transfer is cut off
the moment it goes past the manifest's size), stops at once. A `pipe:` command runs in a process group of its
own, killed whole when it is given up. Fetched shards live in `data.shard_cache` (shard_cache.py) or, without
one, in temporary files that are unlinked as soon as they are open, so nothing is left behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_pipeline.common.errors import DataError
from data_pipeline.common.redaction import redact_text
from data_pipeline.config import DataConfig
from data_pipeline.manifest import Shard
from data_pipeline.shard_cache import ShardCache, checked_sha256, locked_part, part_name

CHUNK_BYTES = 1 << 20
GONE = (403, 404, 410)  # the server will not have it however often it is asked
FIRST_PAUSE_SECONDS = 0.2
LONGEST_PAUSE_SECONDS = 30.0


def redacted(location: str) -> str:
    """A location fit for a message or a log: no user:password@ and no query string (signed URLs carry keys);
    a `pipe:` command with its credentials redacted."""
    parts = urllib.parse.urlsplit(location)
    if not parts.scheme or parts.scheme == "pipe":
        return redact_text(location)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


class TransientError(Exception):
    """A failure that another try may not meet."""


class _Overlong(Exception):
    """The source sent more bytes than the manifest says the shard holds."""


@dataclass(frozen=True)
class Fetcher:
    timeout_seconds: float = 60.0
    retries: int = 5
    deadline_seconds: float = 3600.0
    cache: ShardCache | None = None

    @classmethod
    def from_config(cls, data: DataConfig) -> Fetcher:
        cache = None
        if data.shard_cache:
            cache = ShardCache(Path(data.shard_cache), data.shard_cache_bytes, data.verify == "on_read")
        return cls(data.fetch_timeout_seconds, data.fetch_retries, data.fetch_deadline_seconds, cache)

    def open(self, location: str, shard: Shard) -> BinaryIO:
        """An open binary file holding the shard, checked against the manifest."""
        sha256 = checked_sha256(redacted(location), shard)
        if self.cache and (cached := self.cache.open_cached(sha256)) is not None:
            return cached
        directory = self.cache.directory if self.cache else Path(tempfile.gettempdir())
        part = directory / part_name(sha256)
        with _Transfer(part, shard.bytes) as transfer:
            self._fetch(location, shard, transfer)
            if self.cache:
                return self.cache.add(part, sha256)
            file = open(part, "rb")
        return file  # the transfer unlinked its file: the open one keeps the bytes until it is closed

    def _fetch(self, location: str, shard: Shard, transfer: _Transfer) -> None:
        last_error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(FIRST_PAUSE_SECONDS * 2 ** (attempt - 1), LONGEST_PAUSE_SECONDS))
            deadline = time.monotonic() + self.deadline_seconds
            try:
                if location.startswith(("http://", "https://")):
                    self._http(location, transfer, deadline)
                elif location.startswith("pipe:"):
                    transfer.restart()  # a command cannot resume
                    with _CommandOutput(location.removeprefix("pipe:"), self.timeout_seconds, deadline) as output:
                        transfer.copy(output, deadline)
                else:
                    self._stream(location, transfer, deadline)
                break
            except TransientError as error:
                last_error = error
            except _Overlong:
                raise DataError(
                    f"{redacted(location)}: sends more than the {shard.bytes:,} bytes the manifest records; the shard"
                    " there is not the one prepared: prepare the data again, or point data.shard_url at its shards"
                ) from None
        else:
            raise DataError(f"{redacted(location)}: not fetched after {self.retries + 1} tries ({last_error});"
                            " check the server or the command, or raise data.fetch_retries")
        if (actual := transfer.digest.hexdigest()) != shard.sha256 or transfer.received != shard.bytes:
            raise DataError(
                f"{redacted(location)}: sha256 differs from the manifest's ({actual[:16]}..., not"
                f" {shard.sha256[:16]}...; {transfer.received:,} bytes, not {shard.bytes:,}); the shard is damaged"
                " or from another preparation: prepare the data again"
            )

    def _http(self, url: str, transfer: _Transfer, deadline: float) -> None:
        request = urllib.request.Request(url, headers={"Range": f"bytes={transfer.received}-"} if transfer.received
                                         else {})
        try:
            response = urllib.request.urlopen(request, timeout=min(self.timeout_seconds, deadline - time.monotonic()))
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
                transfer.copy(response, deadline)
            except (OSError, http.client.HTTPException) as error:
                # What arrived is kept: the next try asks for the rest.
                raise TransientError(f"cut after {transfer.received:,} bytes: {error}") from None

    def _stream(self, location: str, transfer: _Transfer, deadline: float) -> None:
        """Other schemes, through webdataset's gopen; the deadline is checked as bytes arrive."""
        import webdataset  # deferred: only shards behind another scheme need it

        transfer.restart()  # cannot resume
        try:
            with webdataset.gopen(location, "rb") as stream:
                transfer.copy(stream, deadline)
        except (TransientError, _Overlong):
            raise
        except Exception as error:  # gopen raises what the command or scheme raised, or a failed exit status
            raise TransientError(str(error)) from None


class _Transfer:
    """The bytes of one shard received so far, in a locked partial file, and their running sha256."""

    def __init__(self, path: Path, expected_bytes: int):
        self.path, self.expected_bytes = path, expected_bytes

    def __enter__(self) -> _Transfer:
        self.file = locked_part(self.path)
        self.digest, self.received = hashlib.sha256(), 0
        return self

    def __exit__(self, *_) -> None:
        self.path.unlink(missing_ok=True)  # gone already once the shard is in the cache
        self.file.close()

    def restart(self) -> None:
        self.digest, self.received = hashlib.sha256(), 0
        self.file.truncate(0)

    def copy(self, stream, deadline: float) -> None:
        # read1: what has arrived, at most one wait; so that bytes received before a connection drops are kept.
        read = getattr(stream, "read1", None) or stream.read
        self.file.seek(0, os.SEEK_END)
        try:
            while chunk := read(CHUNK_BYTES):
                if self.received + len(chunk) > self.expected_bytes:
                    raise _Overlong
                self.file.write(chunk)
                self.digest.update(chunk)
                self.received += len(chunk)
                if time.monotonic() > deadline:
                    raise TransientError(f"{self.received:,} bytes in, still under way after"
                                         " data.fetch_deadline_seconds")
        finally:
            self.file.flush()


class _CommandOutput:
    """The output of a `pipe:` command, read with a time limit: its whole process group (a shell and what it
    started, curl or aws) is killed when nothing comes within the read timeout or the deadline passes."""

    def __init__(self, command: str, timeout_seconds: float, deadline: float):
        self.command, self.timeout_seconds, self.deadline = command, timeout_seconds, deadline

    def __enter__(self) -> _CommandOutput:
        self.process = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, bufsize=0,
                                        start_new_session=True)
        return self

    def __exit__(self, *_) -> None:
        # Not yet reaped, so its pid still names its group: given up (or its shell ended with a child still
        # holding the output open). Once reaped after a clean end, the number may belong to another group.
        if self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()

    def read1(self, size: int) -> bytes:
        ready, _, _ = select.select([self.process.stdout], [], [], self._wait())
        if not ready:
            raise TransientError("the command sent nothing for data.fetch_timeout_seconds or went past"
                                 " data.fetch_deadline_seconds; killed")
        if chunk := os.read(self.process.stdout.fileno(), size):
            return chunk
        try:
            status = self.process.wait(self._wait())
        except subprocess.TimeoutExpired:
            raise TransientError("the command closed its output but did not exit before the deadline") from None
        if status:
            raise TransientError(f"the command exited with status {status}")
        return b""

    def _wait(self) -> float:
        return max(0.0, min(self.timeout_seconds, self.deadline - time.monotonic()))
