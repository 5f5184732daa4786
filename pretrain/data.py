"""The data a run trains on: prepared once, checked against its manifest, then opened by every rank."""

from __future__ import annotations

import os

from data_pipeline.loader import verify_shards
from data_pipeline.prepare import Manifest, prepare
from pretrain.config import Config

# Set by `python -m launch` for the ranks it starts: the fingerprint of the manifest it already verified.
VERIFIED_DATA_VARIABLE = "PRETRAIN_VERIFIED_DATA"


def prepare_and_verify(config: Config, is_main: bool, log) -> Manifest:
    """Prepare the data if needed; on rank 0, check every local shard against the manifest, unless the
    launcher already checked this very manifest."""
    manifest = prepare(config.data, config.model.vocab_size, log=log)
    already_verified = os.environ.get(VERIFIED_DATA_VARIABLE) == manifest.fingerprint
    if is_main and config.data.verify == "start" and not already_verified:
        verify_shards(manifest, config.data.shard_url)
    return manifest
