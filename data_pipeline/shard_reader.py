"""Reading a prepared split's shards: where each shard is (a local file, a URL, a pipe), its blocks of tokens
checked against the manifest (size, sha256 where asked, token ids within the tokenizer's), and the split cut into
windows of seq_len + 1 tokens (inputs and next-token targets).

Block b of a split has windows b*K .. b*K + K - 1 in natural order (K = block_tokens // seq_len; the split's last
block may have fewer)."""

from __future__ import annotations

import tarfile
from collections import OrderedDict

import numpy as np
import torch

from data_pipeline.common.errors import DataError
from data_pipeline.config import OPEN_SHARDS
from data_pipeline.manifest import Manifest, Shard
from data_pipeline.remote import Fetcher, redacted
from data_pipeline.tokenizer import file_sha256


def shard_location(manifest: Manifest, shard: Shard, shard_url: str | None) -> str:
    if shard_url is None:
        return str(manifest.dir / shard.name)
    if "{shard}" in shard_url:
        return shard_url.format(shard=shard.name)
    return f"{shard_url.rstrip('/')}/{shard.name}"


def is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def refuse_if_damaged(location: str, shard: Shard, actual_sha256: str) -> None:
    if actual_sha256 != shard.sha256:
        raise DataError(
            f"{location}: sha256 differs from the manifest's ({actual_sha256[:16]}..., not {shard.sha256[:16]}...);"
            " the shard is damaged or from another preparation: prepare the data again"
        )


class ShardReader:
    """Random access to the blocks of one split. Local shards are indexed once and read by seeking; shards
    behind a URL (http(s), pipe:, ...) are fetched into local files by `fetcher` (remote.py), checked as they
    arrive."""

    def __init__(self, manifest: Manifest, split: str, shard_url: str | None, check_local: bool = False,
                 fetcher: Fetcher | None = None):
        self.manifest = manifest
        self.fetcher = fetcher or Fetcher()
        self.shards = manifest.splits[split]
        self.shard_url = shard_url
        # data.verify=on_read: a local shard's sha256 is checked too, the first time this reader opens it.
        self.check_local = check_local
        self._checked: set[int] = set()
        self.first_block = np.cumsum([0] + [shard.samples for shard in self.shards])
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self._open: OrderedDict[int, tuple[object, list[tuple[int, int]]]] = OrderedDict()

    @property
    def block_count(self) -> int:
        return int(self.first_block[-1])

    def _load(self, index: int) -> tuple[object, list[tuple[int, int]]]:
        shard = self.shards[index]
        location = shard_location(self.manifest, shard, self.shard_url)
        shown = self._shown(index)
        try:
            if is_local(location):
                if self.check_local and index not in self._checked:
                    refuse_if_damaged(location, shard, file_sha256(location))
                    self._checked.add(index)
                source = open(location, "rb")
            else:
                source = self.fetcher.open(location, shard)
            with tarfile.open(fileobj=source, mode="r:") as tar:
                members = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".tokens")]
        except FileNotFoundError:
            raise DataError(f"{shown}: shard missing; restore it or prepare the data again") from None
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"{shown}: cannot read the shard ({error}); prepare the data again") from None
        if len(members) != shard.samples:
            raise DataError(
                f"{shown}: holds {len(members)} of the {shard.samples} samples the manifest lists; the shard is"
                " truncated or damaged: prepare the data again"
            )
        return source, members

    def _shown(self, index: int) -> str:
        """Shard `index`'s location as messages name it."""
        return redacted(shard_location(self.manifest, self.shards[index], self.shard_url))

    def block(self, block_index: int) -> np.ndarray:
        index = int(np.searchsorted(self.first_block, block_index, side="right")) - 1
        if index not in self._open:
            self._open[index] = self._load(index)
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)[1][0].close()
        self._open.move_to_end(index)
        source, members = self._open[index]
        offset, size = members[block_index - int(self.first_block[index])]
        source.seek(offset)
        data = source.read(size)
        if len(data) != size:
            raise DataError(f"{self._shown(index)}: ends inside a sample; the shard is truncated: prepare the data"
                            " again")
        tokens = np.frombuffer(data, dtype=self.dtype)
        # An id past the tokenizer's would index past the embedding (on a GPU, a device-side assert far from here).
        if len(tokens) and (highest := int(tokens.max())) >= self.manifest.tokenizer_vocab_size:
            raise DataError(
                f"{self._shown(index)}: holds token id {highest}, beyond the {self.manifest.tokenizer_vocab_size} ids"
                " of the tokenizer it was prepared with; the shard is damaged or from another preparation: prepare"
                " the data again"
            )
        return tokens


class Windows:
    """The windows of one split: how many there are, the global order, and reading them."""

    def __init__(self, manifest: Manifest, split: str, seq_len: int, shard_url: str | None = None,
                 check_local: bool = False, fetcher: Fetcher | None = None):
        if seq_len > manifest.block_tokens:
            raise DataError(
                f"{manifest.dir}: blocks of {manifest.block_tokens} tokens are shorter than model.seq_len={seq_len};"
                " prepare the data with a larger data.block_tokens"
            )
        self.manifest = manifest
        self.seq_len = seq_len
        self.reader = ShardReader(manifest, split, shard_url, check_local, fetcher)
        self.per_block = manifest.block_tokens // seq_len
        shards = manifest.splits[split]
        last_block_tokens = shards[-1].tokens - (shards[-1].samples - 1) * (manifest.block_tokens + 1)
        self.last_block_windows = (last_block_tokens - 1) // seq_len
        self.count = (self.reader.block_count - 1) * self.per_block + self.last_block_windows
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    def windows_in_block(self, block: int) -> int:
        return self.last_block_windows if block == self.reader.block_count - 1 else self.per_block

    def read(self, window_ids: np.ndarray) -> torch.Tensor:
        """(len(window_ids), seq_len + 1) int64 tensor. Ids are natural-order window numbers."""
        rows = []
        for window in window_ids.tolist():
            block, offset = divmod(window, self.per_block)
            if block not in self._blocks:
                self._blocks[block] = self.reader.block(block)
                if len(self._blocks) > 4 * OPEN_SHARDS:
                    self._blocks.popitem(last=False)
            start = offset * self.seq_len
            rows.append(self._blocks[block][start : start + self.seq_len + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))
