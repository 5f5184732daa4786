"""What a prepared dataset holds, as its manifest.json records it: the shards of each split with their samples,
tokens and sha256, the tokenizer, and the fingerprint that seeds the loader's order."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import DataError

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def shard_pattern(split: str, partition: int) -> str:
    """The names of the shards one partition of a split is written to (and the merged tails, as partition P)."""
    return f"{split}-{partition:05d}-%06d.tar"


@dataclass(frozen=True)
class Shard:
    name: str
    samples: int
    tokens: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset, as described by its manifest.json."""

    dir: Path
    recipe: str
    fingerprint: str
    dtype: str
    block_tokens: int
    end_of_document_id: int
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    splits: dict[str, list[Shard]]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            meta = json.loads(path.read_text())
            return cls(
                dir=directory,
                recipe=meta["recipe"],
                fingerprint=meta["fingerprint"],
                dtype=meta["dtype"],
                block_tokens=meta["block_tokens"],
                end_of_document_id=meta["end_of_document_id"],
                tokenizer_sha256=meta["tokenizer_sha256"],
                tokenizer_vocab_size=meta["tokenizer_vocab_size"],
                splits={split: [checked_shard(path, split, shard) for shard in meta["splits"][split]]
                        for split in SPLITS},
            )
        except FileNotFoundError:
            raise DataError(
                f"{path}: not found; run `python -m launch prepare --config CONFIG` (make data) to create it"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not a manifest this version can read ({error}); prepare the data again") from None


def checked_shard(manifest: Path, split: str, recorded: dict) -> Shard:
    """A shard as the manifest records it, whose name is one this project writes: a name reaches a URL template
    and, with a `pipe:` shard_url, a shell command, so a tampered manifest must not choose it."""
    shard = Shard(**recorded)
    if not re.fullmatch(rf"{split}-\d{{5}}-\d{{6}}\.tar", shard.name):
        raise DataError(
            f"{manifest}: shard name {shard.name!r} is not one `prepare` writes ({split}-PPPPP-NNNNNN.tar); the"
            " manifest was edited or damaged: prepare the data again"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", shard.sha256):
        raise DataError(
            f"{manifest}: shard {shard.name}'s sha256 {shard.sha256!r} is not 64 hexadecimal digits; the manifest was"
            " edited or damaged: prepare the data again"
        )
    return shard
