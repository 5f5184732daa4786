"""The data a run trains on: prepared once, checked against its manifest, then opened by every rank."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from data_pipeline.manifest import Manifest
from data_pipeline.prepare import prepare
from data_pipeline.verification import verify_shards
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


@dataclass(frozen=True)
class DataOrder:
    """The settings that decide which windows make up each step: a position in the data means nothing without
    them. Checkpoints record it, and a resume compares."""

    global_batch_tokens: int
    seq_len: int
    seed: int
    shuffle_blocks: int
    mix_shards: int

    SETTINGS: ClassVar[dict[str, str]] = {"global_batch_tokens": "train.global_batch_tokens",
                                          "seq_len": "model.seq_len", "seed": "seed",
                                          "shuffle_blocks": "data.shuffle_blocks", "mix_shards": "data.mix_shards"}

    @classmethod
    def of(cls, config: Config) -> DataOrder:
        return cls(config.train.global_batch_tokens, config.model.seq_len, config.seed, config.data.shuffle_blocks,
                   config.data.mix_shards)

    def record(self) -> dict[str, int]:
        return asdict(self)

    def changes_since(self, saved: dict[str, Any]) -> list[str]:
        """'setting: saved -> now' for each setting that differs from a recorded order."""
        # A checkpoint from before a setting existed read its data in another order: it shows as "unrecorded".
        return [f"{setting}: {saved.get(field, 'unrecorded')} -> {getattr(self, field)}"
                for field, setting in self.SETTINGS.items() if saved.get(field) != getattr(self, field)]
