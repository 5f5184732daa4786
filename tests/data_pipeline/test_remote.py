"""Shards read over HTTP from a real nginx, through a proxy that drops, refuses and delays connections."""

import re
import shutil

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import Windows
from data_pipeline.manifest import Manifest
from data_pipeline.remote import Fetcher
from tests.servers import FaultyProxy, Nginx

SEQ_LEN = 32
PATIENT = Fetcher(timeout_seconds=5, retries=8)


@pytest.fixture
def served(prepared, tmp_path):
    """A copy of the prepared shards, served by nginx."""
    root = tmp_path / "served"
    shutil.copytree(prepared.dir, root)
    with Nginx(root, tmp_path / "nginx") as nginx:
        yield root, nginx


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
    assert str(refused.value).startswith(f"{nginx.url}/{shard}?...: the server does not have this shard (HTTP 404)")
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
    cache = Fetcher(timeout_seconds=5, retries=0, cache_dir=tmp_path / "cache", cache_bytes=bound)
    with Nginx(root, tmp_path / "nginx") as nginx:
        windows = Windows(prepared, "val", SEQ_LEN, shard_url=nginx.url, fetcher=cache)
        everything = windows.read(np.arange(windows.count))
    kept = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert sum((tmp_path / "cache" / name).stat().st_size for name in kept) <= bound and kept
    newest = Manifest.load(prepared.dir).splits["val"][-1]
    assert f"{newest.sha256}.tar" in kept
    # The server is gone; what the cache holds is still read, and checked by its size.
    reread = Windows(prepared, "val", SEQ_LEN, shard_url=nginx.url, fetcher=cache)
    last_block_windows = np.arange(windows.count - reread.last_block_windows, windows.count)
    assert (reread.read(last_block_windows) == everything[last_block_windows]).all()
