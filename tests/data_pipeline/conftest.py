import shutil

import pytest

from data_pipeline.prepare import prepare
from tests.helpers import episodes_config
from tests.servers import Nginx


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One prepared dataset shared by the read-only tests."""
    return prepare(episodes_config(tmp_path_factory.mktemp("prepared") / "data"), vocab_size=512, log=lambda *_: None)


@pytest.fixture
def served(prepared, tmp_path):
    """A copy of the prepared shards, served by nginx."""
    root = tmp_path / "served"
    shutil.copytree(prepared.dir, root)
    with Nginx(root, tmp_path / "nginx") as nginx:
        yield root, nginx
