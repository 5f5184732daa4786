import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.common.errors import DataError
from data_pipeline.config import DataConfig
from data_pipeline.embedded import episode_inventories
from data_pipeline.manifest import Manifest
from data_pipeline.partitions import Claims, is_done
from data_pipeline.prepare import begin_preparation, finish_preparation, prepare, prepare_partitions, staging_dir
from data_pipeline.tokenizer import END_OF_DOCUMENT, load_tokenizer
from tests.helpers import episodes_config, mixed_config, mixed_sources, same_files, split_stream


def quiet(*_):
    pass


def test_preparing_again_gives_byte_identical_shards_whatever_the_number_of_processes(tmp_path):
    sources = mixed_sources(tmp_path / "corpus")
    one = prepare(mixed_config(tmp_path / "one", sources, workers=1), vocab_size=512, log=quiet)
    two = prepare(mixed_config(tmp_path / "two", sources, workers=2), vocab_size=512, log=quiet)
    assert same_files(one.dir, two.dir)
    assert len({shard.name.split("-")[1] for shard in one.splits["train"]}) == 9  # 8 partitions and the tails
    assert sum(shard.samples for shard in one.splits["train"]) > 20


def test_manifest_lists_every_shard_with_its_counts_and_sha256(prepared):
    manifest = json.loads((prepared.dir / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == hashlib.sha256(prepared.tokenizer_path.read_bytes()).hexdigest()
    assert manifest["dtype"] == "uint16" and manifest["sources"][0]["kind"] == "icl_episodes"
    for split in ("train", "val"):
        for shard in manifest["splits"][split]:
            path = prepared.dir / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert re.fullmatch(rf"{split}-\d{{5}}-\d{{6}}\.tar", shard["name"])
            assert shard["samples"] >= 1 and shard["tokens"] <= shard["samples"] * 257


def test_documents_keep_their_boundaries_and_the_splits_are_disjoint(prepared):
    tokenizer = Tokenizer.from_file(str(prepared.tokenizer_path))
    documents = {}
    for split in ("train", "val"):
        stream = split_stream(prepared, split)
        assert stream[-1] == prepared.end_of_document_id
        text = tokenizer.decode(stream.tolist(), skip_special_tokens=False)
        documents[split] = [d.strip() for d in text.split(END_OF_DOCUMENT) if d.strip()]
    assert len(documents["train"]) + len(documents["val"]) == 600
    assert len(documents["val"]) > 20
    assert not set(documents["train"]) & set(documents["val"])


def test_every_made_up_word_is_a_single_token(prepared):
    tokenizer = Tokenizer.from_file(str(prepared.tokenizer_path))
    inputs, labels = episode_inventories(64, 8)
    assert all(len(tokenizer.encode(word).ids) == 1 for word in inputs + labels)


def test_prepared_data_is_reused_and_a_different_recipe_is_refused_not_overwritten(tmp_path):
    directory = tmp_path / "d"
    prepare(episodes_config(directory), vocab_size=512, log=quiet)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    messages = []
    prepare(episodes_config(directory), vocab_size=512, log=messages.append)
    assert messages == [], "an up-to-date directory is reused, not rebuilt"
    with pytest.raises(DataError, match=re.escape(f"{directory}: was prepared from a different data config")):
        prepare(episodes_config(directory, episodes=700), vocab_size=512)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_a_failed_preparation_leaves_no_data_where_runs_look_for_it(tmp_path):
    config = episodes_config(tmp_path / "d")
    config.sources[0].vocabulary_words = 5000  # more made-up words than exist: fails while reading
    with pytest.raises(DataError, match="lower vocabulary_words"):
        prepare(config, vocab_size=512)
    assert not (tmp_path / "d").exists()


def test_the_tasks_of_a_job_write_the_partitions_each_claims_first_and_a_requeued_task_takes_its_own_again(
        tmp_path):
    sources = mixed_sources(tmp_path / "corpus")
    config = mixed_config(tmp_path / "data", sources, workers=1)
    begin_preparation(config, vocab_size=512, log=quiet)
    staging = staging_dir(tmp_path / "data")
    claims = staging / "partitions" / "claims-7"
    assert all(Claims(claims, "task 1").take(partition) for partition in (0, 1, 2, 3))
    assert Claims(claims, "task 0").take(5)  # task 0 had claimed partition 5 before its node was lost

    prepare_partitions(config, vocab_size=512, claims=Claims(claims, "task 0"))  # the requeued task 0
    assert [p for p in range(config.partitions) if is_done(staging, p)] == [4, 5, 6, 7]
    prepare_partitions(config, vocab_size=512, claims=Claims(claims, "task 1"))
    manifest = finish_preparation(config, vocab_size=512, log=quiet)
    single = prepare(mixed_config(tmp_path / "single", sources, workers=1), vocab_size=512, log=quiet)
    assert same_files(manifest.dir, single.dir)


def preparation_workers(job: subprocess.Popen) -> list[psutil.Process]:
    return [child for child in psutil.Process(job.pid).children()
            if any("spawn_main" in part for part in child.cmdline())]


# Killed whole (the command and its workers, as when a node is lost), or one worker alone (as the out-of-memory
# killer picks the largest process): then the command stops by itself, rather than wait for the dead worker.
@pytest.mark.parametrize("one_worker", [False, True])
def test_a_preparation_killed_mid_way_resumes_keeping_the_partitions_it_finished(tmp_path, one_worker):
    sources = mixed_sources(tmp_path / "corpus")
    config = tmp_path / "prepare.yaml"
    workers = 2 if one_worker else 1
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 512}, "data": mixed_config(
        tmp_path / "data", sources, workers).model_dump(mode="json")}))
    job = subprocess.Popen([sys.executable, "-m", "launch", "prepare", "--config", str(config)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partitions = tmp_path / ".data.partial" / "partitions"
    deadline = time.monotonic() + 120
    # The first partition to be finished, whichever it is: the others are still to write.
    while not (published := sorted(partitions.glob("[0-9]" * 5))):
        assert job.poll() is None and time.monotonic() < deadline, "the preparation ended before it could be killed"
        time.sleep(0.01)
    finished = published[0]
    if one_worker:
        preparation_workers(job)[0].kill()
        assert job.wait(timeout=60) == 1
    else:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    written = {path.name: path.stat().st_mtime_ns for path in finished.glob("*.tar")}
    assert written and not (tmp_path / "data").exists()

    manifest = prepare(mixed_config(tmp_path / "data", sources, 2), vocab_size=512, log=quiet)
    assert {name: (manifest.dir / name).stat().st_mtime_ns for name in written} == written  # kept, not redone
    uninterrupted = prepare(mixed_config(tmp_path / "uninterrupted", sources, 2), vocab_size=512, log=quiet)
    assert same_files(manifest.dir, uninterrupted.dir)


def test_a_directory_that_is_not_prepared_data_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no prepared data"):
        prepare(episodes_config(tmp_path / "d"), vocab_size=512)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_a_given_tokenizer_is_used_and_copied_beside_the_shards(tmp_path, prepared):
    config = episodes_config(tmp_path / "d")
    config.tokenizer = str(prepared.tokenizer_path)
    manifest = prepare(config, vocab_size=512, log=quiet)
    assert manifest.tokenizer_sha256 == prepared.tokenizer_sha256


def test_a_given_tokenizer_without_an_end_of_document_token_is_refused_by_name(tmp_path):
    path = tmp_path / "tok.json"
    Tokenizer(models.BPE()).save(str(path))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{re.escape(END_OF_DOCUMENT)}"):
        load_tokenizer(path, max_vocab_size=512)


def gapped_tokenizer(path, highest_id: int):
    """A word-level tokenizer whose ids leave a gap: four words, the last with id `highest_id`."""
    tokenizer = Tokenizer(models.WordLevel({END_OF_DOCUMENT: 0, "[UNK]": 1, "red": 2, "blue": highest_id},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_with_ids_at_or_above_the_model_vocabulary_is_refused_before_preparing(tmp_path):
    config = episodes_config(tmp_path / "d")
    config.tokenizer = str(gapped_tokenizer(tmp_path / "gapped.json", highest_id=600))
    with pytest.raises(DataError, match=f"^{re.escape(config.tokenizer)}: ") as refused:
        prepare(config, vocab_size=512, log=quiet)
    # The field to raise, and the least vocabulary that holds the ids.
    assert "model.vocab_size" in str(refused.value) and re.search(r"\b601\b", str(refused.value))
    assert not (tmp_path / "d").exists()


def test_token_ids_beyond_16_bits_are_stored_whole(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"red blue {i} blue"}) + "\n" for i in range(200)))
    config = DataConfig(dir=str(tmp_path / "d"), sources=[{"kind": "jsonl", "paths": [str(corpus)]}],
                        val_fraction=0.1, block_tokens=64, workers=1,
                        tokenizer=str(gapped_tokenizer(tmp_path / "gapped.json", highest_id=70_000)))
    manifest = prepare(config, vocab_size=2**17, log=quiet)
    assert manifest.dtype == "uint32"
    assert split_stream(manifest, "train")[:5].tolist() == [2, 70_000, 1, 70_000, 0]


def test_a_given_tokenizer_that_is_not_json_is_refused_by_name(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("not a tokenizer")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a valid tokenizer.json")):
        load_tokenizer(path, max_vocab_size=512)


def test_a_manifest_naming_a_shard_that_prepare_does_not_write_is_refused(tmp_path, prepared):
    data = tmp_path / "data"
    shutil.copytree(prepared.dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"][0]["name"] = "x.tar; touch pwned"  # would reach a `pipe:` command
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="x.tar; touch pwned"):
        Manifest.load(data)


def test_a_manifest_whose_sha256_is_not_a_digest_is_refused_when_loaded(tmp_path, prepared):
    data = tmp_path / "data"
    shutil.copytree(prepared.dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"][0]["sha256"] = "../../x"  # would reach a cache's file name
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(str(data / "manifest.json"))):
        Manifest.load(data)


def test_two_preparations_of_one_directory_prepare_it_once_and_a_killed_ones_leftovers_are_cleared(tmp_path):
    config = episodes_config(tmp_path / "data", workers=1)
    prepare(config, vocab_size=512, log=quiet)  # to learn what a whole preparation leaves
    reference = tmp_path / "reference"
    (tmp_path / "data").rename(reference)
    # What a preparation killed while writing partition 0 leaves: its recipe, tokenizer and half a partition.
    partial = tmp_path / ".data.partial"
    (partial / "partitions" / ".00000.tmp-elsewhere-4242").mkdir(parents=True)
    (partial / "partitions" / ".00000.tmp-elsewhere-4242" / "train-00000-000000.tar").write_bytes(b"half a shard")
    (partial / "partitions" / ".00000.tmp-elsewhere-4242" / ".writing").touch()  # its lock, free since it died
    shutil.copy(reference / "tokenizer.json", partial / "tokenizer.json")
    (partial / "recipe.json").write_text(json.dumps({"recipe": Manifest.load(reference).recipe}))
    context = multiprocessing.get_context("spawn")
    preparations = [context.Process(target=prepare, args=(config, 512, str)) for _ in range(2)]
    for preparation in preparations:
        preparation.start()
    for preparation in preparations:
        preparation.join(timeout=300)
    assert [preparation.exitcode for preparation in preparations] == [0, 0]
    assert same_files(tmp_path / "data", reference)
    assert not partial.exists()
