"""A preparation killed at any point (a lost node, the out-of-memory killer, a cancelled job) finishes when run
again, with the bytes an uninterrupted preparation writes.

Each kill is real: a child process runs the preparation and, at the chosen point, kills its own process group (the
preparation and its workers at once, as when a node is lost) with SIGKILL; nothing runs after it."""

import itertools
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest

import data_pipeline
from data_pipeline import partitions
from data_pipeline import prepare as preparation
from data_pipeline.config import DataConfig
from data_pipeline.partitions import PARTITIONS, Claims, is_done, plan, start_worker, write_partition
from data_pipeline.prepare import begin_preparation, prepare, prepare_partitions, staging_dir
from tests.helpers import same_files

# Children forked from a server that imported this module and did nothing else: they start at once, and no
# thread of the test process (the tokenizers' pool) holds a lock they need.
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload([__name__])
WORDS = "red blue green sky sea tree stone river cloud bird fish wind".split()


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i * 7 + j) % 12] for j in range(5 + i % 13))}) + "\n"
                            for i in range(600)))
    return path


def small_config(directory: Path, corpus: Path) -> DataConfig:
    """Four partitions of several shards each; one worker, so that a kill finds partitions done and not done."""
    return DataConfig(dir=str(directory), sources=[{"kind": "jsonl", "paths": [str(corpus)]}], val_fraction=0.1,
                      block_tokens=64, shard_bytes=4096, partitions=4, workers=1, unit_bytes=4000)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> Path:
    return prepare(small_config(tmp_path_factory.mktemp("uninterrupted") / "data", corpus), 512, log=quiet).dir


def kill_everything() -> None:
    os.killpg(0, signal.SIGKILL)


def prepare_until(config: DataConfig, stage: str) -> None:
    """Prepare, in a process group of its own, killing it whole at `stage`: the nth call of a function that matches."""
    os.setsid()
    owner, name, matches, nth = KILL_POINTS[stage]
    original, calls = getattr(owner, name), itertools.count(1)

    def dying(*args, **kwargs):
        if matches(*args) and next(calls) == nth:
            kill_everything()
        return original(*args, **kwargs)

    setattr(owner, name, dying)
    prepare(config, 512, log=quiet)


def named(name: str):
    return lambda source, target: Path(target).name == name


KILL_POINTS = {
    # the tokenizer written in full beside its name, not renamed into place yet
    "tokenizer": (os, "replace", named("tokenizer.json"), 1),
    # two partitions written, the next being written
    "partitions": (preparation, "wait", lambda *_: True, 3),
    # the merge part way: some shards gathered into place, the others not yet, the closing shards not finished
    "merge": (os, "replace", lambda source, target: Path(target).suffix == ".tar", 3),
    # every shard in place, the manifest written in full beside its name
    "manifest": (os, "replace", named("manifest.json"), 1),
    # everything written, the staging folder about to become the dataset
    "publish": (preparation, "publish_directory", lambda *_: True, 1),
}


@pytest.mark.parametrize("stage", KILL_POINTS)
def test_a_preparation_killed_at_any_stage_finishes_when_run_again_with_the_uninterrupted_bytes(
        tmp_path, corpus, uninterrupted, stage):
    config = small_config(tmp_path / "data", corpus)
    killed = CHILDREN.Process(target=prepare_until, args=(config, stage))
    killed.start()
    killed.join(timeout=120)
    assert killed.exitcode == -signal.SIGKILL, f"the preparation was not killed at the {stage} stage"
    assert not (tmp_path / "data").exists()

    manifest = prepare(config, 512, log=quiet)
    assert same_files(manifest.dir, uninterrupted)  # the shards, manifest.json and tokenizer.json, byte for byte
    assert not staging_dir(tmp_path / "data").exists()


def test_a_partition_damaged_since_it_was_written_is_written_again(tmp_path, corpus, uninterrupted):
    config = small_config(tmp_path / "data", corpus)
    begin_preparation(config, 512, log=quiet)
    prepare_partitions(config, 512)
    shard = next((staging_dir(tmp_path / "data") / PARTITIONS / "00002").glob("train-*.tar"))
    shard.write_bytes(shard.read_bytes()[:1000])

    manifest = prepare(config, 512, log=quiet)
    assert same_files(manifest.dir, uninterrupted)


def write_partition_paused(config: DataConfig, partition: int, paused, resume) -> None:
    """Write one partition as a preparation worker does, pausing once it is written, before it is published."""
    staging = staging_dir(Path(config.dir))
    original = partitions.publish_directory

    def publish_when_resumed(work, final):
        paused.set()
        resume.wait()
        return original(work, final)

    partitions.publish_directory = publish_when_resumed
    start_worker(str(staging / "tokenizer.json"))
    write_partition(staging, config, "uint16", partition, plan(config)[partition])


def test_running_again_clears_what_dead_workers_left_but_not_what_live_ones_are_writing(tmp_path, corpus):
    config = small_config(tmp_path / "data", corpus)
    begin_preparation(config, 512, log=quiet)
    staging = staging_dir(tmp_path / "data")
    writers, resumes = {}, {}
    for partition in (1, 2):
        paused, resumes[partition] = CHILDREN.Event(), CHILDREN.Event()
        writers[partition] = CHILDREN.Process(target=write_partition_paused,
                                              args=(config, partition, paused, resumes[partition]), daemon=True)
        writers[partition].start()
        assert paused.wait(timeout=60)
    os.kill(writers[2].pid, signal.SIGKILL)  # the worker of partition 2 dies; that of partition 1 is still writing
    writers[2].join()
    written = {partition: next((staging / PARTITIONS).glob(f".{partition:05d}.tmp-*")) for partition in (1, 2)}

    begin_preparation(config, 512, log=quiet)  # a second launch, while the first one's worker still writes
    assert written[1].is_dir() and not written[2].exists()
    resumes[1].set()
    writers[1].join(timeout=60)
    assert writers[1].exitcode == 0 and is_done(staging, 1)


PACKAGE = str(Path(data_pipeline.__file__).parent)


def claim_killed_at_line(directory: Path, owner: str, partition: int, line: int) -> None:
    """Claim a partition, killed at the `line`th line the project's code runs (os.kill: nothing runs after it)."""
    lines = itertools.count(1)

    def trace(frame, event, _):
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        if event == "line" and next(lines) == line:
            os.kill(os.getpid(), signal.SIGKILL)
        return trace

    sys.settrace(trace)
    Claims(directory, owner).take(partition)


def test_a_task_killed_at_any_point_of_claiming_a_partition_takes_it_again_when_requeued(tmp_path):
    for line in itertools.count(1):
        claims = tmp_path / f"claims-{line}"
        task = CHILDREN.Process(target=claim_killed_at_line, args=(claims, "task 0", 5, line))
        task.start()
        task.join(timeout=60)
        if task.exitcode == 0:  # claimed before its `line`th line: every point was tried
            break
        assert task.exitcode == -signal.SIGKILL
        assert Claims(claims, "task 0").take(5), f"killed at line {line}, the requeued task lost its partition"
        assert not Claims(claims, "task 1").take(5)
    assert line > 3
