from collections import Counter

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import TokenWindows, TrainBatches, validation_batches
from pretrain.config import BatchLayout

SEQ_LEN = 8


def windows_of(count: int) -> TokenWindows:
    # Window i holds the tokens i*SEQ_LEN .. i*SEQ_LEN+SEQ_LEN, so its first token names it.
    return TokenWindows(np.arange(count * SEQ_LEN + 1, dtype=np.uint32), SEQ_LEN)


def layout(world_size: int, micro: int = 2, sequences_per_step: int = 12) -> BatchLayout:
    return BatchLayout(world_size, SEQ_LEN, micro, sequences_per_step // (world_size * micro))


def step_windows(batches: TrainBatches, step: int) -> list[int]:
    return [int(first) // SEQ_LEN for micro in batches.micro_batches(step) for first in micro[:, 0]]


def test_windows_hold_inputs_and_their_next_token_targets():
    batch = windows_of(10).gather(np.array([3]))
    assert batch.tolist() == [list(range(24, 33))]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_is_seen_exactly_once_per_epoch_with_equal_work_per_rank(world_size):
    windows = windows_of(100)  # 8 steps of 12 windows per epoch; 4 windows left over are dropped
    ranks = [TrainBatches(windows, layout(world_size), rank, seed=3) for rank in range(world_size)]
    seen = Counter()
    for step in range(ranks[0].steps_per_epoch):
        per_rank = [step_windows(batches, step) for batches in ranks]
        assert len({len(w) for w in per_rank}) == 1, "every rank gets the same number of windows"
        seen.update(w for rank_windows in per_rank for w in rank_windows)
    assert len(seen) == 96 and set(seen.values()) == {1}


def test_the_order_does_not_depend_on_the_world_size_and_changes_each_epoch():
    windows = windows_of(100)
    one = TrainBatches(windows, layout(1), 0, seed=3)
    three = [TrainBatches(windows, layout(3), rank, seed=3) for rank in range(3)]
    for step in (0, 5, 8, 13):
        assert step_windows(one, step) == [w for batches in three for w in step_windows(batches, step)]
    assert step_windows(one, 0) != step_windows(one, 8)  # epoch 1 is reshuffled
    assert step_windows(one, 0) != step_windows(TrainBatches(windows, layout(1), 0, seed=4), 0)


def test_too_little_training_data_for_one_batch_is_a_clear_error():
    with pytest.raises(DataError, match="lower train.global_batch_tokens"):
        TrainBatches(windows_of(10), layout(1), 0, seed=0)


def test_validation_batches_are_fixed_spread_over_the_split_and_disjoint_across_ranks():
    windows = windows_of(100)
    per_rank = [validation_batches(windows, layout(2), rank, batches=3) for rank in range(2)]
    firsts = [int(t) // SEQ_LEN for batches in per_rank for batch in batches for t in batch[:, 0]]
    assert len(firsts) == len(set(firsts)) == 12
    assert min(firsts) == 0 and max(firsts) == 99
    again = validation_batches(windows, layout(2), 0, batches=3)
    assert all((a == b).all() for a, b in zip(again, per_rank[0]))
