"""Whichever ZeRO stage and number of ranks a user picks, they train the same model (fp32, same global batch).

The runs are the session's shared runs (tests/conftest.py): the launcher and hostfile tests read some of them.
Every stage runs on two ranks, where its partitioning is real; one rank under ZeRO is the (2, 1) run."""

import pytest


@pytest.fixture
def reference(shared_runs):
    return shared_runs.losses(stage=0, ranks=1)


@pytest.mark.parametrize(("stage", "ranks"), [(0, 2), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_every_zero_stage_and_world_size_gives_the_losses_of_zero0_on_one_rank(shared_runs, reference, stage, ranks):
    losses = shared_runs.losses(stage, ranks)
    assert losses == pytest.approx(reference, rel=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("stage", "ranks"), [(2, 2), (3, 2)])
def test_activation_checkpointing_changes_memory_not_the_model(shared_runs, reference, stage, ranks):
    assert shared_runs.losses(stage, ranks, activation_checkpointing=True) == pytest.approx(reference, rel=1e-4)


def test_compiling_the_model_changes_speed_not_the_model(shared_runs, reference):
    assert shared_runs.losses(stage=2, ranks=1, compile=True) == pytest.approx(reference, rel=1e-4)
