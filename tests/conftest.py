"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_CONFIG, deep_merge


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write the tiny config (with `changes` merged in) under tmp_path; return its path."""

    def write(changes: dict | None = None, name: str = "config.yaml") -> Path:
        config = deep_merge(TINY_CONFIG, changes or {})
        config.setdefault("output_dir", str(tmp_path / "runs"))
        config["data"].setdefault("dir", str(tmp_path / "data"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
