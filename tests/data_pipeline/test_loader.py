import random
import re
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.common.errors import DataError
from data_pipeline.config import BatchLayout
from data_pipeline.loader import TrainBatches, document_ids, iterate_steps, validation_batches
from data_pipeline.manifest import Manifest
from data_pipeline.order import GlobalOrder
from data_pipeline.shard_reader import Windows
from data_pipeline.verification import verify_shards
from tests.helpers import split_stream

SEQ_LEN = 32
SEQUENCES_PER_STEP = 12  # divides into 1, 2 and 3 ranks


def layout(world_size: int, micro: int = 2) -> BatchLayout:
    return BatchLayout(world_size, SEQ_LEN, micro, SEQUENCES_PER_STEP // (world_size * micro))


def rank_batches(manifest, world_size: int, seed: int = 0, shuffle_blocks: int = 4) -> list[TrainBatches]:
    windows = Windows(manifest, "train", SEQ_LEN)
    return [TrainBatches(windows, layout(world_size), rank, shuffle_blocks, seed) for rank in range(world_size)]


def windows_seen(ranks: list[TrainBatches], start: int, end: int, workers: int) -> list[list[int]]:
    """Per rank, the window ids it was handed for steps start..end-1, through the DataLoader."""
    seen = []
    for batches in ranks:
        ids = []
        for _step, (_tokens, window_ids) in iterate_steps(batches, start, end, workers):
            ids += window_ids.tolist()
        seen.append(ids)
    return seen


def epoch_remainder(ranks: list[TrainBatches]) -> set[int]:
    """The windows that do not fill a last global batch: dropped, so every rank does equal work."""
    order, steps = ranks[0].order, ranks[0].steps_per_epoch
    return set(order.at(0, np.arange(steps * SEQUENCES_PER_STEP, ranks[0].windows.count)).tolist())


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_hands_out_every_window_exactly_once_with_equal_work_per_rank(prepared, world_size, workers):
    ranks = rank_batches(prepared, world_size)
    steps = ranks[0].steps_per_epoch
    seen = windows_seen(ranks, 0, steps, workers)
    assert {len(ids) for ids in seen} == {steps * SEQUENCES_PER_STEP // world_size}
    counts = Counter(i for ids in seen for i in ids)
    assert set(counts.values()) == {1}
    assert set(counts) | epoch_remainder(ranks) == set(range(ranks[0].windows.count))
    assert len(epoch_remainder(ranks)) < SEQUENCES_PER_STEP


def test_a_run_stopped_at_a_random_step_and_resumed_at_another_world_size_covers_the_rest_exactly_once(prepared):
    for stop_world, resume_world in ((2, 3), (3, 1), (1, 2)):
        before, after = rank_batches(prepared, stop_world), rank_batches(prepared, resume_world)
        steps = before[0].steps_per_epoch
        stop = random.Random(stop_world).randrange(1, steps)
        first = windows_seen(before, 0, stop, workers=0)
        rest = windows_seen(after, stop, steps, workers=2)
        counts = Counter(i for ids in first + rest for i in ids)
        assert set(counts.values()) == {1}
        assert set(counts) | epoch_remainder(before) == set(range(before[0].windows.count))


def test_a_run_that_continues_with_another_global_batch_takes_the_next_windows_of_the_order(prepared):
    windows = Windows(prepared, "train", SEQ_LEN)
    before = [TrainBatches(windows, layout(2), rank, 4, 0) for rank in range(2)]
    stop = 4  # 48 sequences: not a whole number of the bigger steps, so one of them straddles the epoch's end
    sequences_seen = before[0].tokens_before(stop) // SEQ_LEN
    # Half again as many sequences a step after the resume (on 3 ranks): steps of 18 from sequence 48 on.
    bigger = BatchLayout(world_size=3, seq_len=SEQ_LEN, micro_batch_size=2, accumulation_steps=3)
    after = [TrainBatches(windows, bigger, rank, 4, 0, resumed_at=(stop, sequences_seen)) for rank in range(3)]
    end = after[0].steps_per_epoch + 2  # on into the second epoch
    assert after[0].tokens_before(stop + 2) == (sequences_seen + 2 * bigger.sequences_per_step) * SEQ_LEN
    handed_out = [i for step in range(stop) for batches in before for i in batches.window_ids(step).tolist()]
    handed_out += [i for step in range(stop, end) for batches in after for i in batches.window_ids(step).tolist()]
    epoch = after[0].epoch_sequences
    positions = np.arange(len(handed_out))
    expected = [int(before[0].order.at(int(position // epoch), np.array([position % epoch]))[0])
                for position in positions]
    assert handed_out == expected
    assert epoch % bigger.sequences_per_step == 0 and len(handed_out) > epoch


def test_the_order_is_reproducible_independent_of_workers_and_world_size_and_reshuffled_each_epoch(prepared):
    one_rank = rank_batches(prepared, 1)
    steps = one_rank[0].steps_per_epoch
    reference = windows_seen(one_rank, 0, 2 * steps, workers=0)[0]
    assert windows_seen(rank_batches(prepared, 1), 0, 2 * steps, workers=2)[0] == reference
    three_ranks = windows_seen(rank_batches(prepared, 3), 0, 2 * steps, workers=2)
    per_step = SEQUENCES_PER_STEP // 3
    interleaved = [i for step in range(2 * steps) for ids in three_ranks
                   for i in ids[step * per_step:(step + 1) * per_step]]
    assert interleaved == reference
    epoch_one = reference[:steps * SEQUENCES_PER_STEP]
    assert epoch_one != reference[steps * SEQUENCES_PER_STEP:]
    assert epoch_one != windows_seen(rank_batches(prepared, 1, seed=1), 0, steps, workers=0)[0]


def test_windows_hold_the_stream_tokens_and_their_next_token_targets(prepared):
    stream = split_stream(prepared, "train")
    (batches,) = rank_batches(prepared, 1)
    for step in (0, 3):
        tokens, window_ids = batches.step_windows(step)
        assert tokens.shape == (SEQUENCES_PER_STEP, SEQ_LEN + 1)
        for row, window in zip(tokens.numpy(), window_ids.tolist()):
            assert (row == stream[window * SEQ_LEN: window * SEQ_LEN + SEQ_LEN + 1]).all()


def test_the_shuffle_window_is_bounded_to_one_group_of_blocks(prepared):
    windows = Windows(prepared, "train", SEQ_LEN)
    order = GlobalOrder(windows, shuffle_blocks=4, seed=0)
    per_group = 4 * windows.per_block
    blocks_of_first_group = {int(w) // windows.per_block for w in order.at(0, np.arange(per_group))}
    assert len(blocks_of_first_group) == 4


@pytest.mark.parametrize("mix_shards", [1, 3, 8])
def test_each_group_draws_on_every_shard_of_its_run_in_proportion_to_their_sizes(prepared, mix_shards):
    """Sources written to separate shards mix within every step: a shuffle group takes blocks from each of the
    `mix_shards` shards of its run in proportion to their sizes, never from more shards than a reader keeps
    open, and hands out their windows in proportion."""
    windows = Windows(prepared, "train", SEQ_LEN)
    first_block = windows.reader.first_block
    assert len(first_block) - 1 >= 8  # shards enough for runs of 8
    order = GlobalOrder(windows, shuffle_blocks=4, seed=0, mix_shards=mix_shards)
    groups, _ = order._epoch_layout(0)
    shard_of = np.searchsorted(first_block, np.concatenate(groups), side="right") - 1
    assert sorted(np.concatenate(groups).tolist()) == list(range(windows.reader.block_count))
    position = 0
    for group in groups:
        shards = shard_of[position:position + len(group)]
        position += len(group)
        assert len(set(shards.tolist())) <= mix_shards
    # The first run's blocks: each shard's share of any start of it is its share of the run, within one block.
    run_shards = [int(shard) for shard in dict.fromkeys(shard_of.tolist())][:mix_shards]
    assert_proportional(shard_of[:sum(int(first_block[s + 1] - first_block[s]) for s in run_shards)])
    # Within each group, the windows: so every step holds each shard of its group in proportion.
    _, group_starts = order._epoch_layout(0)
    for start, end in zip(group_starts[:-1], group_starts[1:]):
        window_blocks = order.at(0, np.arange(start, end)) // windows.per_block
        assert_proportional(np.searchsorted(first_block, window_blocks, side="right") - 1)


def assert_proportional(sequence: np.ndarray) -> None:
    """Each value's count in every prefix of `sequence` is its share of the whole, within one."""
    for value in np.unique(sequence):
        counts = np.cumsum(sequence == value)
        assert (np.abs(counts - counts[-1] / len(sequence) * np.arange(1, len(sequence) + 1)) <= 1).all()


def test_validation_batches_are_fixed_spread_over_the_split_and_disjoint_across_ranks(prepared):
    windows = Windows(prepared, "val", SEQ_LEN)
    per_rank = [validation_batches(windows, layout(2), rank, batches=3) for rank in range(2)]
    assert all(batch.shape == (2, SEQ_LEN + 1) for batches in per_rank for batch in batches)
    rows = {tuple(row) for batches in per_rank for batch in batches for row in batch.tolist()}
    assert len(rows) == 12
    again = validation_batches(Windows(prepared, "val", SEQ_LEN), layout(2), 0, batches=3)
    assert all((a == b).all() for a, b in zip(again, per_rank[0]))


@pytest.fixture
def damaged(prepared, tmp_path):
    """A private copy of the prepared dataset that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(prepared.dir, copy)
    return Manifest.load(copy)


def test_a_flipped_byte_is_refused_when_read_with_verification_on_read_whether_local_or_remote(damaged, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(damaged.dir, remote)
    for directory in (damaged.dir, remote):
        shard = directory / damaged.splits["train"][0].name
        data = bytearray(shard.read_bytes())
        data[600] ^= 1  # inside the first sample's tar header: the tokens still read, wrongly trusted without a hash
        shard.write_bytes(bytes(data))
    local = Windows(damaged, "train", SEQ_LEN, check_local=True)
    with pytest.raises(DataError, match=re.escape(f"{damaged.dir / damaged.splits['train'][0].name}: sha256")):
        local.read(np.arange(4))
    piped = Windows(damaged, "train", SEQ_LEN, shard_url=f"pipe:cat {remote}/{{shard}}", check_local=True)
    with pytest.raises(DataError, match=re.escape(f"pipe:cat {remote / damaged.splits['train'][0].name}: sha256")):
        piped.read(np.arange(4))


def test_a_token_id_beyond_the_tokenizer_is_refused_when_read_naming_the_shard(damaged):
    shard = damaged.dir / damaged.splits["train"][0].name
    with tarfile.open(shard) as tar:
        first_tokens = next(member for member in tar.getmembers() if member.name.endswith(".tokens")).offset_data
    data = bytearray(shard.read_bytes())
    data[first_tokens + 2 : first_tokens + 4] = (0xFFFF).to_bytes(2, "little")  # the second token, as uint16
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{shard}: holds token id 65535, beyond the")):
        Windows(damaged, "train", SEQ_LEN).read(np.arange(4))


def test_a_truncated_shard_is_named_at_start_and_when_read_without_verification(damaged):
    shard = damaged.dir / damaged.splits["train"][0].name
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=re.escape(f"{shard}: sha256")):
        verify_shards(damaged, None)
    windows = Windows(damaged, "train", SEQ_LEN)
    with pytest.raises(DataError, match=re.escape(f"{shard}: ") + "(holds|cannot read|ends inside)"):
        windows.read(np.arange(windows.count))


def test_shards_can_be_read_through_a_url_and_are_verified_on_read(damaged, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(damaged.dir, remote)
    url = f"pipe:cat {remote}/{{shard}}"
    local, piped = Windows(damaged, "train", SEQ_LEN), Windows(damaged, "train", SEQ_LEN, shard_url=url)
    ids = np.arange(0, local.count, 7)
    assert (local.read(ids) == piped.read(ids)).all()
    shard = remote / damaged.splits["train"][0].name
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(DataError, match=re.escape(f"pipe:cat {shard}: sha256 differs")):
        Windows(damaged, "train", SEQ_LEN, shard_url=url).read(np.arange(4))


def test_document_ids_start_a_new_document_after_each_end_of_document_token():
    end = 0
    windows = torch.tensor([[5, 6, end, 7, end, end, 8, 9]])
    assert document_ids(windows, end).tolist() == [[0, 0, 0, 1, 1, 2, 3]]
