"""Whichever ZeRO stage and number of ranks a user picks, they train the same model (fp32, same global batch)."""

import pytest
import yaml

from tests.helpers import TINY_CONFIG, deep_merge, launch
from tests.helpers import losses_by_step


def train_losses(directory, stage: int, ranks: int, activation_checkpointing: bool = False,
                 compile: bool = False) -> list[float]:
    name = f"zero{stage}-ranks{ranks}" + ("-checkpointed" if activation_checkpointing else "") + (
        "-compiled" if compile else "")
    config = deep_merge(TINY_CONFIG, {
        "name": name,
        "output_dir": str(directory / "runs"),
        "data": {"dir": str(directory / "data")},
        "train": {"max_steps": 10, "checkpoint_every": 100},
        "deepspeed": {
            "zero_stage": stage,
            "precision": "fp32",
            "activation_checkpointing": activation_checkpointing,
            "compile": compile,
        },
        "eval": {"interval": 0, "batches": 1},
    })
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    launch(path, ranks=ranks)
    losses = losses_by_step(directory / "runs" / config["name"])
    return [losses[step] for step in range(1, 11)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("zero")


@pytest.fixture(scope="module")
def reference(workdir):
    return train_losses(workdir, stage=0, ranks=1)


@pytest.mark.parametrize(("stage", "ranks"), [(0, 2), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_every_zero_stage_and_world_size_gives_the_losses_of_zero0_on_one_rank(workdir, reference, stage, ranks):
    losses = train_losses(workdir, stage, ranks)
    assert losses == pytest.approx(reference, rel=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("stage", "ranks"), [(2, 2), (3, 2)])
def test_activation_checkpointing_changes_memory_not_the_model(workdir, reference, stage, ranks):
    assert train_losses(workdir, stage, ranks, activation_checkpointing=True) == pytest.approx(reference, rel=1e-4)


def test_compiling_the_model_changes_speed_not_the_model(workdir, reference):
    assert train_losses(workdir, stage=2, ranks=1, compile=True) == pytest.approx(reference, rel=1e-4)
