"""The check of a dataset's shards before training, and the record that spares a second start from hashing again."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_pipeline import verification
from data_pipeline.common.errors import DataError
from data_pipeline.manifest import Manifest
from data_pipeline.verification import VERIFIED_RECORD, file_stamp, read_verified, verify_shards


@pytest.fixture
def corpus(prepared, tmp_path):
    """A private copy of the prepared dataset, to damage."""
    shutil.copytree(prepared.dir, tmp_path / "data")
    return Manifest.load(tmp_path / "data")


def shards_in_checking_order(manifest: Manifest) -> list[Path]:
    return [manifest.dir / shard.name for split in manifest.splits.values() for shard in split]


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[600] ^= 1
    path.write_bytes(bytes(content))


def damage_keeping_size_and_modification_time(shard: Path, tmp_path: Path) -> None:
    """As `touch -r` leaves a shard changed in place: the old size and modification time."""
    before = shard.stat()
    flip_a_byte(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))


def restore_a_damaged_backup_as_cp_p_does(shard: Path, tmp_path: Path) -> None:
    """A backup copied with its times (cp -p, rsync -a), damaged since (bit rot keeps its times), copied back over
    the shard with them: the shard has the size and modification time it was checked with, not its bytes."""
    backup = shutil.copy2(shard, tmp_path / "backup.tar")
    before = backup.stat()
    flip_a_byte(backup)
    os.utime(backup, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.copy2(backup, shard)


def test_a_missing_shard_is_named_before_training(corpus):
    shard = corpus.dir / corpus.splits["train"][2].name
    shard.unlink()
    with pytest.raises(DataError, match=re.escape(f"{shard}: shard missing")):
        verify_shards(corpus, None)


def test_a_shard_whose_sha256_differs_is_named_before_training(corpus):
    shard = corpus.dir / corpus.splits["val"][0].name
    flip_a_byte(shard)
    with pytest.raises(DataError, match=re.escape(f"{shard}: sha256")):
        verify_shards(corpus, None)


def test_shards_checked_once_are_not_hashed_again_until_they_change(corpus, monkeypatch):
    hashed = []
    real_sha256 = verification.file_sha256
    monkeypatch.setattr(verification, "file_sha256", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    shards = {shard.name for split in corpus.splits.values() for shard in split}
    verify_shards(corpus, None)
    assert shards <= set(hashed)
    hashed.clear()
    verify_shards(corpus, None)  # as a requeued job or a second launch does
    assert shards.isdisjoint(hashed)
    shard = corpus.dir / corpus.splits["train"][1].name
    flip_a_byte(shard)
    with pytest.raises(DataError, match=re.escape(f"{shard}: sha256")):
        verify_shards(corpus, None)
    assert hashed.count(shard.name) == 1


def test_a_manifest_written_for_another_tokenizer_is_named(corpus):
    other = Tokenizer.from_file(str(corpus.tokenizer_path))
    other.add_tokens(["<a token the shards were not made with>"])
    other.save(str(corpus.tokenizer_path))
    manifest = corpus.dir / "manifest.json"
    with pytest.raises(DataError, match=re.escape(f"{manifest}: was written for another tokenizer")):
        verify_shards(corpus, None)


@pytest.mark.parametrize("damage", [damage_keeping_size_and_modification_time, restore_a_damaged_backup_as_cp_p_does])
def test_a_shard_damaged_with_its_size_and_modification_time_kept_is_hashed_again_and_refused(corpus, tmp_path,
                                                                                                damage):
    verify_shards(corpus, None)
    shard = shards_in_checking_order(corpus)[3]
    checked = shard.stat()
    damage(shard, tmp_path)
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (checked.st_size, checked.st_mtime_ns)
    with pytest.raises(DataError, match=re.escape(f"{shard}: sha256")):
        verify_shards(corpus, None)


def test_a_verification_stopped_by_a_damaged_shard_keeps_the_record_of_those_it_checked_before(corpus):
    *good, last = shards_in_checking_order(corpus)
    flip_a_byte(last)
    with pytest.raises(DataError, match=re.escape(f"{last}: sha256")):
        verify_shards(corpus, None)
    recorded = read_verified(corpus.dir / VERIFIED_RECORD, corpus.fingerprint)
    assert recorded == {str(shard): file_stamp(str(shard)) for shard in good}


def test_a_verification_killed_midway_keeps_the_record_of_the_shards_it_hashed_so_far(corpus):
    *hashable, last = shards_in_checking_order(corpus)
    # The last shard a pipe that nothing writes: hashing it waits for ever, as a start on a huge corpus is
    # still hashing when the job is preempted.
    last.unlink()
    os.mkfifo(last)
    save_every = 2
    saved = hashable[: len(hashable) - len(hashable) % save_every]
    child = subprocess.Popen([
        sys.executable, "-c",
        "import sys; from pathlib import Path; from data_pipeline.manifest import Manifest;"
        " from data_pipeline.verification import verify_shards;"
        " verify_shards(Manifest.load(Path(sys.argv[1])), None, save_every=int(sys.argv[2]))",
        str(corpus.dir), str(save_every),
    ])
    try:
        deadline = time.monotonic() + 60
        while len(read_verified(corpus.dir / VERIFIED_RECORD, corpus.fingerprint)) < len(saved):
            assert child.poll() is None and time.monotonic() < deadline, "the verification never saved its record"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)  # as SLURM preempts a job: no handler, no chance to save at the end
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    recorded = read_verified(corpus.dir / VERIFIED_RECORD, corpus.fingerprint)
    assert recorded == {str(shard): file_stamp(str(shard)) for shard in saved}
