"""One `data.shard_cache` read through by many processes at once, with shards damaged in it, partial files left
in it by killed transfers, and manifests that try to name files outside it."""

import fcntl
import hashlib
import multiprocessing
import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from data_pipeline.common.errors import DataError
from data_pipeline.config import DataConfig
from data_pipeline.manifest import Shard
from data_pipeline.remote import Fetcher
from data_pipeline.shard_cache import file_status

READERS = 8
FORK = multiprocessing.get_context("fork")  # the readers start in milliseconds, torch and all already imported


def cached_fetcher(cache, bound=100 * 2**20, verify="start"):
    return Fetcher.from_config(DataConfig(fetch_timeout_seconds=5, fetch_retries=2, shard_cache=str(cache),
                                          shard_cache_bytes=bound, verify=verify))


def sha256_of(file) -> str:
    with file:
        return hashlib.sha256(file.read()).hexdigest()


def read_every_shard_three_times(reader, url, shards, cache, bound):
    """What one rank does: read each shard, in an order of its own, so its neighbours evict what it reads.
    Returns how many of its reads gave the bytes of the manifest's sha256."""
    fetcher = cached_fetcher(cache, bound)
    order = shards[reader:] + shards[:reader]
    return sum(sha256_of(fetcher.open(f"{url}/{shard.name}", shard)) == shard.sha256 for shard in order * 3)


def test_eight_processes_reading_through_one_small_cache_all_read_the_right_bytes(prepared, served, tmp_path):
    _root, nginx = served
    shards = prepared.splits["train"]
    bound = 2 * max(shard.bytes for shard in shards)  # room for two of the eight shards: evictions all the time
    with FORK.Pool(READERS) as pool:
        reads = pool.starmap(read_every_shard_three_times,
                             [(reader, nginx.url, shards, tmp_path / "cache", bound) for reader in range(READERS)])
    assert reads == [3 * len(shards)] * READERS
    assert sum(path.stat().st_size for path in (tmp_path / "cache").glob("*.tar")) <= bound


def fetch_into(cache, location, shard):
    sha256_of(cached_fetcher(cache, bound=shard.bytes).open(location, shard))


def make_room_slowly(cache, locked):
    """What a process making room in the cache does, slowed down: it holds the cache's lock."""
    with open(cache / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked.set()
        time.sleep(60)


def test_a_shard_fetched_while_another_process_evicts_waits_its_turn_to_enter_the_cache(prepared, tmp_path):
    cache, shard = tmp_path / "cache", prepared.splits["train"][0]
    cache.mkdir()
    locked = FORK.Event()
    evicting = FORK.Process(target=make_room_slowly, args=(cache, locked))
    evicting.start()
    try:
        assert locked.wait(20)
        reader = FORK.Process(target=fetch_into, args=(cache, f"pipe:cat {prepared.dir / shard.name}", shard))
        reader.start()
        deadline = time.monotonic() + 20
        while ([path.stat().st_size for path in cache.glob(".*.part")] != [shard.bytes]
               and not list(cache.glob("*.tar"))):
            assert time.monotonic() < deadline, "the transfer did not finish"
            time.sleep(0.05)
        # The reader waits for the cache's lock: /proc/locks lists it as blocked ("->") on the lock file's inode.
        inode = (cache / ".lock").stat().st_ino
        deadline = time.monotonic() + 20
        while not any(fields[1] == "->" and fields[5] == str(reader.pid) and fields[6].endswith(f":{inode}")
                      for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())):
            assert time.monotonic() < deadline, "the reader did not come to wait for the cache's lock"
            time.sleep(0.05)
        # Two evicting at once would both delete, each counting what the other is deleting.
        assert not list(cache.glob("*.tar")) and reader.is_alive()
    finally:
        evicting.kill()
    reader.join(20)
    assert reader.exitcode == 0 and [path.name for path in cache.glob("*.tar")] == [f"{shard.sha256}.tar"]


@pytest.mark.parametrize("verify", ["start", "on_read"])
def test_a_cached_shard_flipped_in_place_is_fetched_again_not_trained_on(prepared, served, tmp_path, verify):
    root, nginx = served
    shard = prepared.splits["train"][0]
    url = f"{nginx.url}/{shard.name}"
    fetcher = cached_fetcher(tmp_path / "cache", verify=verify)
    cached = tmp_path / "cache" / f"{shard.sha256}.tar"
    sha256_of(fetcher.open(url, shard))

    def flip_one_byte():  # same size, written where it lies
        with open(cached, "r+b") as file:
            file.seek(shard.bytes // 2)
            byte = file.read(1)[0]
            file.seek(shard.bytes // 2)
            file.write(bytes([byte ^ 1]))

    flip_one_byte()
    assert sha256_of(fetcher.open(url, shard)) == shard.sha256
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == shard.sha256  # and the cache holds it whole again
    flip_one_byte()
    (root / shard.name).unlink()  # nowhere to fetch it from again: refused rather than read
    with pytest.raises(DataError, match=f"^{re.escape(url)}: .*\\b404\\b"):  # the server's status
        fetcher.open(url, shard)


def test_under_on_read_a_cached_shard_is_hashed_each_time_it_is_opened_even_when_its_record_vouches_for_it(
        prepared, served, tmp_path):
    _root, nginx = served
    shard = prepared.splits["train"][0]
    url = f"{nginx.url}/{shard.name}"
    fetcher = cached_fetcher(tmp_path / "cache", verify="on_read")
    cached = tmp_path / "cache" / f"{shard.sha256}.tar"
    sha256_of(fetcher.open(url, shard))
    damaged = bytearray(cached.read_bytes())
    damaged[7] ^= 1
    cached.write_bytes(bytes(damaged))
    # Damage that leaves the file's status alone (bit rot) looks like this: a record that vouches for it.
    with open(cached, "rb") as file:
        fetcher.cache.record_verified(shard.sha256, file_status(file))
    assert sha256_of(fetcher.open(url, shard)) == shard.sha256


@pytest.mark.parametrize("recorded", ["../../x", "A" * 64, "0" * 63, "0" * 64 + "/x"])
def test_a_manifest_sha256_that_is_not_64_hex_digits_is_refused_and_names_no_file(tmp_path, recorded):
    source, fetched = tmp_path / "source.tar", tmp_path / "fetched"
    source.write_bytes(b"0123456789")
    cache = tmp_path / "a" / "b" / "cache"
    shard = Shard(name="train-00000-000000.tar", samples=1, tokens=1, sha256=recorded, bytes=10)
    before = set(tmp_path.rglob("*"))
    command = f"pipe:touch {fetched}; cat {source}"
    with pytest.raises(DataError, match=f"^{re.escape(command)}: "):
        cached_fetcher(cache).open(command, shard)
    assert not fetched.exists()  # refused before any transfer
    assert {path for path in tmp_path.rglob("*") if cache not in path.parents} - before <= {
        tmp_path / "a", tmp_path / "a" / "b", cache}


def fetch_a_large_shard_slowly(cache):
    """A transfer that has received 100 kB and waits for the rest."""
    shard = Shard(name="train-00000-000099.tar", samples=1, tokens=1, sha256="0" * 64, bytes=10**6)
    cached_fetcher(cache).open("pipe:head -c 100000 /dev/zero; sleep 60", shard)


def kill_with_its_command(process):
    """SIGKILL, as the OOM killer or a lost node would; its command, in a process group of its own, too."""
    command = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    for child in command:
        child.kill()


def test_partial_files_of_killed_transfers_are_deleted_and_those_under_way_kept_and_counted(prepared, tmp_path):
    cache = tmp_path / "cache"
    killed, under_way = (FORK.Process(target=fetch_a_large_shard_slowly, args=(cache,)) for _ in range(2))
    killed.start()
    under_way.start()
    try:
        deadline = time.monotonic() + 20
        while sorted(path.stat().st_size for path in cache.glob(".*.part")) != [100000, 100000]:
            assert time.monotonic() < deadline, "the transfers did not start"
            time.sleep(0.05)
        kill_with_its_command(killed)
        # What a killed process left of a shard's record, long ago (no host in its name: judged by its age).
        old_record = cache / f".{'1' * 64}.verified.partial-12345"
        old_record.write_text("[1, 2")
        os.utime(old_record, (time.time() - 86400, time.time() - 86400))
        first, second = prepared.splits["train"][:2]
        bound = first.bytes + second.bytes  # room for both, were the transfer under way not counted
        fetcher = cached_fetcher(cache, bound)
        for shard in (first, second):
            sha256_of(fetcher.open(f"pipe:cat {prepared.dir / shard.name}", shard))
        parts = list(cache.glob(".*.part"))
        assert [path.name for path in parts] == [f".{'0' * 64}.{under_way.pid}@{socket.gethostname()}.part"]
        assert not old_record.exists()
        assert [path.name for path in cache.glob("*.tar")] == [f"{second.sha256}.tar"]
    finally:
        kill_with_its_command(under_way)
    sha256_of(fetcher.open(f"pipe:cat {prepared.dir / first.name}", first))
    assert not list(cache.glob(".*.part"))  # its writer is gone now too
