"""Shards read over HTTP from a real nginx, through a proxy that drops, refuses and delays connections, from a
server that sends too much or too slowly, and from commands that never end."""

import re
import shutil
import time

import numpy as np
import psutil
import pytest

from data_pipeline.common.errors import DataError
from data_pipeline.config import DataConfig
from data_pipeline.manifest import Manifest
from data_pipeline.remote import Fetcher
from data_pipeline.shard_reader import Windows
from tests.servers import FaultyProxy, Nginx, UnrulyServer

SEQ_LEN = 32
PATIENT = Fetcher(timeout_seconds=5, retries=8)


def test_shards_streamed_through_resets_503s_and_delays_read_as_the_local_ones(prepared, served):
    _root, nginx = served
    local = Windows(prepared, "train", SEQ_LEN)
    ids = np.arange(local.count)
    with FaultyProxy(nginx.port) as proxy:
        remote = Windows(prepared, "train", SEQ_LEN, shard_url=proxy.url, fetcher=PATIENT)
        assert (remote.read(ids) == local.read(ids)).all()
    assert all(count >= 2 for count in proxy.counts.values()), proxy.counts
    assert proxy.ranged_requests >= 1  # a transfer cut short went on where it stopped


def test_a_shard_the_server_no_longer_has_stops_the_reader_naming_it_without_the_query(prepared, served):
    root, nginx = served
    shard = prepared.splits["train"][0].name
    (root / shard).unlink()
    signed = nginx.url + "/{shard}?X-Signature=planted-key"
    with pytest.raises(DataError) as refused:
        Windows(prepared, "train", SEQ_LEN, shard_url=signed, fetcher=PATIENT).read(np.arange(4))
    assert str(refused.value).startswith(f"{nginx.url}/{shard}?...: ")  # the shard's URL, its query left out
    assert re.search(r"\b404\b", str(refused.value))  # the server's status
    assert "planted-key" not in str(refused.value)


def test_a_shard_whose_bytes_differ_from_the_manifest_is_refused_after_the_transfer(prepared, served):
    root, nginx = served
    shard = root / prepared.splits["train"][0].name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{nginx.url}/{shard.name}: sha256 differs")):
        Windows(prepared, "train", SEQ_LEN, shard_url=nginx.url, fetcher=PATIENT).read(np.arange(4))


def test_a_cache_keeps_fetched_shards_within_its_bound_and_serves_them_when_the_server_is_gone(prepared, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(prepared.dir, root)
    shards = prepared.splits["val"]
    bound = sum(shard.bytes for shard in shards[:2])
    cache = Fetcher.from_config(DataConfig(fetch_timeout_seconds=5, fetch_retries=0,
                                           shard_cache=str(tmp_path / "cache"), shard_cache_bytes=bound))
    with Nginx(root, tmp_path / "nginx") as nginx:
        windows = Windows(prepared, "val", SEQ_LEN, shard_url=nginx.url, fetcher=cache)
        everything = windows.read(np.arange(windows.count))
    kept = sorted(path.name for path in (tmp_path / "cache").glob("*.tar"))
    assert sum((tmp_path / "cache" / name).stat().st_size for name in kept) <= bound and kept
    newest = Manifest.load(prepared.dir).splits["val"][-1]
    assert f"{newest.sha256}.tar" in kept
    # The server is gone; what the cache holds is still read.
    reread = Windows(prepared, "val", SEQ_LEN, shard_url=nginx.url, fetcher=cache)
    last_block_windows = np.arange(windows.count - reread.last_block_windows, windows.count)
    assert (reread.read(last_block_windows) == everything[last_block_windows]).all()


def test_a_server_sending_more_than_the_manifests_size_is_cut_off_there_and_refused(prepared, tmp_path):
    shard = prepared.splits["train"][0]
    fetcher = Fetcher.from_config(DataConfig(fetch_timeout_seconds=5, fetch_retries=2,
                                             shard_cache=str(tmp_path / "cache")))
    with UnrulyServer(prepared.dir, extra_bytes=128 * 2**20) as server:
        with pytest.raises(DataError, match=re.escape(f"{server.url}/{shard.name}: ")):
            fetcher.open(f"{server.url}/{shard.name}", shard)
    # Read no further than the manifest's size (and what the sockets' buffers held): not the 128 MiB on offer,
    # which an endless stream would make a full disk. And not tried again: the server holds another object.
    assert server.sent_bytes < shard.bytes + 32 * 2**20
    assert not list((tmp_path / "cache").glob("*.tar")) and not list((tmp_path / "cache").glob(".*.part"))


def test_an_http_transfer_trickling_past_the_deadline_is_given_up_in_time(prepared):
    shard = prepared.splits["train"][0]
    fetcher = Fetcher.from_config(DataConfig(fetch_timeout_seconds=5, fetch_retries=0, fetch_deadline_seconds=1))
    # 512 bytes every 0.3 s never meet the read timeout; the whole shard would take 18 s.
    with UnrulyServer(prepared.dir, chunk_bytes=512, pause_seconds=0.3) as server:
        started = time.monotonic()
        with pytest.raises(DataError, match=f"^{re.escape(server.url)}/{re.escape(shard.name)}: "):
            fetcher.open(f"{server.url}/{shard.name}", shard)
    assert time.monotonic() - started < 3


def test_a_pipe_command_that_never_ends_is_killed_with_what_it_started_at_the_deadline(prepared, tmp_path):
    shard = prepared.splits["train"][0]
    fetcher = Fetcher.from_config(DataConfig(fetch_timeout_seconds=60, fetch_retries=0, fetch_deadline_seconds=1))
    started_pid = tmp_path / "sleep.pid"
    started = time.monotonic()
    with pytest.raises(DataError, match=re.escape("pipe:sleep 1000")):
        fetcher.open(f"pipe:sleep 1000 & echo $! > {started_pid}; wait", shard)
    assert time.monotonic() - started < 5
    sleeper = int(started_pid.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(sleeper) and psutil.Process(sleeper).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command's child outlived the fetch"
        time.sleep(0.05)


def test_a_failing_pipe_command_is_named_with_its_credentials_redacted(prepared):
    shard = prepared.splits["train"][0]
    fetcher = Fetcher.from_config(DataConfig(fetch_timeout_seconds=5, fetch_retries=0))
    with pytest.raises(DataError) as refused:
        fetcher.open("pipe:curl -sf -u alice:planted-pw-31 http://127.0.0.1:9/nothing", shard)
    assert "pipe:curl -sf -u alice:" in str(refused.value) and "planted-pw-31" not in str(refused.value)


def test_a_pipe_command_failing_part_way_is_run_again_from_the_start(prepared, tmp_path):
    shard = prepared.splits["train"][0]
    source, failed_once = prepared.dir / shard.name, tmp_path / "failed-once"
    command = (f"pipe:if [ -e {failed_once} ]; then cat {source}; else touch {failed_once}; head -c 1000 {source};"
               " exit 1; fi")
    fetcher = Fetcher.from_config(DataConfig(fetch_retries=1, shard_cache=str(tmp_path / "cache")))
    with fetcher.open(command, shard) as file:
        assert file.read() == source.read_bytes()
