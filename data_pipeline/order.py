"""The order in which an epoch visits a split's windows: one global order, a function of (seed, epoch, manifest
fingerprint) only, never of the world size, the workers or the clock.

  1. the shards are permuted;
  2. the blocks of each run of `mix_shards` shards in that order are interleaved in proportion to the shards'
     sizes (block j of a shard of n blocks at (j + 1/2) / n of the run), so shards of different sources mix;
  3. the blocks, in that order, form groups of `shuffle_blocks` (within a run); each group's windows are permuted
     shard by shard and the shards' windows interleaved the same way, so every step holds each shard of its
     group in proportion (a bounded shuffle window: a reader holds one group's blocks, from at most `mix_shards`
     shards, not the dataset)."""

from __future__ import annotations

import numpy as np

from data_pipeline.config import OPEN_SHARDS
from data_pipeline.shard_reader import Windows


def interleaved(parts: list[np.ndarray]) -> np.ndarray:
    """The parts' elements in one sequence in which each part's share of every prefix is its share of the whole,
    within one element: element j of a part of n sits at (j + 1/2) / n of the way."""
    places = np.concatenate([(np.arange(len(part)) + 0.5) / max(len(part), 1) for part in parts])
    return np.concatenate(parts)[np.argsort(places, kind="stable")]


class GlobalOrder:
    """Which natural-order window sits at each position of an epoch (see the module docstring)."""

    def __init__(self, windows: Windows, shuffle_blocks: int, seed: int, mix_shards: int = OPEN_SHARDS):
        self.windows = windows
        self.group_blocks = shuffle_blocks
        self.mix_shards = mix_shards
        self.seed = [seed, int(windows.manifest.fingerprint[:8], 16)]
        self.shard_blocks = np.array([shard.samples for shard in windows.reader.shards])
        self._epoch: tuple[int, list[np.ndarray], np.ndarray] | None = None
        self._group: tuple[tuple[int, int], np.ndarray] | None = None

    def _epoch_layout(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's groups of blocks, and the first position of each group."""
        if self._epoch is None or self._epoch[0] != epoch:
            shard_order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.shard_blocks))
            first_block = self.windows.reader.first_block
            groups = []
            for start in range(0, len(shard_order), self.mix_shards):
                shards = shard_order[start:start + self.mix_shards]
                mixed = interleaved([np.arange(first_block[shard], first_block[shard + 1]) for shard in shards])
                # Groups stay within a run, so a reader never needs more shards at once than it keeps open.
                groups += [mixed[first:first + self.group_blocks] for first in range(0, len(mixed), self.group_blocks)]
            per_block, short_block = self.windows.per_block, self.windows.reader.block_count - 1
            missing = per_block - self.windows.last_block_windows  # the split's last block may be short
            group_sizes = [len(group) * per_block - missing * int((group == short_block).any()) for group in groups]
            self._epoch = (epoch, groups, np.concatenate([[0], np.cumsum(group_sizes)]))
        return self._epoch[1], self._epoch[2]

    def _group_windows(self, epoch: int, group: int, groups: list[np.ndarray]) -> np.ndarray:
        """The natural-order ids of one group's windows, in their shuffled order: each shard's windows permuted, then
        the shards interleaved, so that every step holds each shard (each source) in proportion."""
        if self._group is None or self._group[0] != (epoch, group):
            generator = np.random.default_rng([*self.seed, epoch, group + 1])
            members = groups[group]
            shard_of = np.searchsorted(self.windows.reader.first_block, members, side="right") - 1
            shuffled_shards = []
            for shard in np.unique(shard_of):
                ids = np.concatenate([block * self.windows.per_block + np.arange(self.windows.windows_in_block(block))
                                      for block in members[shard_of == shard]])
                shuffled_shards.append(ids[generator.permutation(len(ids))])
            self._group = ((epoch, group), interleaved(shuffled_shards))
        return self._group[1]

    def at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        groups, group_starts = self._epoch_layout(epoch)
        group_of = np.searchsorted(group_starts, positions, side="right") - 1
        result = np.empty(len(positions), dtype=np.int64)
        for group in np.unique(group_of):
            chosen = group_of == group
            result[chosen] = self._group_windows(epoch, int(group), groups)[positions[chosen] - group_starts[group]]
        return result
