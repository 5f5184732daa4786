import pytest

from data_pipeline.prepare import prepare
from data_pipeline.config import DataConfig


def episodes_config(directory, workers: int = 2, **changes) -> DataConfig:
    """A small real dataset: in-context episodes, small blocks and shards so there are many of each."""
    source = {"kind": "icl_episodes", "episodes": 600, **changes}
    return DataConfig(dir=str(directory), sources=[source], val_fraction=0.1, block_tokens=256, shard_bytes=8192,
                      workers=workers)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One prepared dataset shared by the read-only tests."""
    return prepare(episodes_config(tmp_path_factory.mktemp("prepared") / "data"), vocab_size=512, log=lambda *_: None)
