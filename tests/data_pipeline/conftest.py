import pytest

from data_pipeline.prepare import prepare
from tests.helpers import episodes_config


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One prepared dataset shared by the read-only tests."""
    return prepare(episodes_config(tmp_path_factory.mktemp("prepared") / "data"), vocab_size=512, log=lambda *_: None)
