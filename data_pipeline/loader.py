"""Deterministic, resumable batches of token windows from a prepared dataset's shards.

Windows are seq_len + 1 tokens (inputs and next-token targets) cut from each block; block b of a split has
windows b*K .. b*K + K - 1 in natural order (K = block_tokens // seq_len; the split's last block may have
fewer).

One global order per epoch, a function of (seed, epoch, manifest fingerprint) only:
  1. the shards are permuted;
  2. the blocks of each run of `mix_shards` shards in that order are interleaved in proportion to the shards'
     sizes (block j of a shard of n blocks at (j + 1/2) / n of the run), so shards of different sources mix;
  3. the blocks, in that order, form groups of `shuffle_blocks` (within a run); each group's windows are permuted
     shard by shard and the shards' windows interleaved the same way, so every step holds each shard of its
     group in proportion (a bounded shuffle window: a reader holds one group's blocks, from at most `mix_shards`
     shards, not the dataset).
Optimizer step s takes positions [s*S, (s+1)*S) of that order (S sequences per step); rank r takes the r-th
equal slice. So every rank does the same number of steps by construction, no window is repeated or skipped
within an epoch, and the step number alone is the loader's state: a run resumed at any world size with the
same global batch continues exactly. (A run that continues after changing S goes on from the sequence its
checkpoint reached.) DataLoader workers each take whole steps (worker k of n takes every n-th), so adding
workers changes nothing but speed.
"""

from __future__ import annotations

import signal
import tarfile
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.common.errors import DataError
from data_pipeline.config import OPEN_SHARDS, BatchLayout
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


class TrainBatches:
    """One rank's training micro-batches, addressed by global step.

    Step s starts at sequence `first_sequence(s)` of the order: s*S from the start, or counted on from where a
    resumed run's checkpoint left off (`resumed_at`: its step and sequence), which may be mid-way through a step
    of another S if the run continues after a change of the global batch."""

    def __init__(self, windows: Windows, layout: BatchLayout, rank: int, shuffle_blocks: int, seed: int,
                 resumed_at: tuple[int, int] = (0, 0), mix_shards: int = OPEN_SHARDS):
        self.windows = windows
        self.layout = layout
        self.rank = rank
        self.resumed_at = resumed_at
        self.order = GlobalOrder(windows, shuffle_blocks, seed, mix_shards)
        self.steps_per_epoch = windows.count // layout.sequences_per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{windows.manifest.dir}: the training split has {windows.count} windows of {windows.seq_len + 1}"
                f" tokens, fewer than one global batch of {layout.sequences_per_step}; lower"
                " train.global_batch_tokens or add data"
            )
        self.epoch_sequences = self.steps_per_epoch * layout.sequences_per_step

    def first_sequence(self, step: int) -> int:
        resumed_step, resumed_sequence = self.resumed_at
        return resumed_sequence + (step - resumed_step) * self.layout.sequences_per_step

    def tokens_before(self, step: int) -> int:
        """Tokens trained on before optimizer step `step` (0-based), by the steps of this run and those before."""
        return self.first_sequence(step) * self.layout.seq_len

    def window_ids(self, step: int) -> np.ndarray:
        """Natural-order ids of this rank's windows at optimizer step `step` (0-based)."""
        first = self.first_sequence(step) + self.rank * self.layout.sequences_per_rank
        epochs, positions = np.divmod(np.arange(first, first + self.layout.sequences_per_rank), self.epoch_sequences)
        ids = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):  # one, but for a step that straddles the end of an epoch
            in_epoch = epochs == epoch
            ids[in_epoch] = self.order.at(int(epoch), positions[in_epoch])
        return ids

    def step_windows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's windows at `step`: tokens (sequences_per_rank, seq_len + 1) and their window ids.

        One tensor per step rather than one per micro-batch: handing a batch from a worker process costs
        per tensor, and the training loop splits it into micro-batches for free.
        """
        ids = self.window_ids(step)
        return self.windows.read(ids), torch.from_numpy(ids)


class _StepStream(torch.utils.data.IterableDataset):
    def __init__(self, batches: TrainBatches, start_step: int, end_step: int):
        self.batches, self.start_step, self.end_step = batches, start_step, end_step

    def __iter__(self) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor] | DataError]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start_step + worker, self.end_step, workers):
            try:
                yield step, self.batches.step_windows(step)
            except DataError as error:
                # Handed over as data: raised in a worker, DataLoader would wrap it in the worker's traceback.
                yield step, error
                return


def iterate_steps(
    batches: TrainBatches, start_step: int, end_step: int, workers: int
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(step, (tokens, window ids)) for start_step .. end_step - 1, in order; read ahead by `workers` processes.

    DataLoader hands out the workers' items round-robin, and worker k yields every workers-th step, so the
    stream is in step order whatever the number of workers.
    """
    started = iter(torch.utils.data.DataLoader(  # the workers start reading ahead now
        _StepStream(batches, start_step, end_step), batch_size=None, num_workers=workers,
        persistent_workers=False, prefetch_factor=4 if workers else None, worker_init_fn=_ignore_stop_signals,
    ))
    return _raising(started)


def _raising(items: Iterator[tuple[int, object]]) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    for step, item in items:
        if isinstance(item, DataError):
            try:
                raise item
            finally:
                # No reference cycle (error -> traceback -> this frame -> error) may keep the DataLoader alive:
                # its workers ignore SIGTERM (see below), and a rank exiting with them still running would wait
                # for them forever. Freed by reference counting, it shuts them down as the error is handled.
                del item, items
        yield step, item


def _ignore_stop_signals(_worker_id: int) -> None:
    # SLURM signals every process of a job on preemption; a reader that died of it would fail the rank before
    # the rank could save. The rank decides when to stop, and its readers end with it.
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def document_ids(tokens: torch.Tensor, end_of_document_id: int) -> torch.Tensor:
    """Per input position of each window (tokens: (n, seq_len + 1)), the index of its document within the
    window: it goes up by one after every end-of-document token, which belongs to the document it ends."""
    inputs = tokens[:, :-1]
    ended_before = torch.cumsum(inputs == end_of_document_id, dim=1) - (inputs == end_of_document_id).long()
    return ended_before


def validation_batches(windows: Windows, layout: BatchLayout, rank: int, batches: int) -> list[torch.Tensor]:
    """A fixed set of validation micro-batches for this rank, spread evenly over the whole split so the loss
    represents every source in it rather than whichever comes first."""
    micro = layout.micro_batch_size
    per_batch = micro * layout.world_size
    batches = min(batches, windows.count // per_batch)
    if batches == 0:
        raise DataError(
            f"{windows.manifest.dir}: the validation split has {windows.count} windows, fewer than one micro-batch"
            f" per rank ({per_batch}); raise data.val_fraction or lower train.micro_batch_size"
        )
    chosen = np.linspace(0, windows.count - 1, batches * per_batch).round().astype(np.int64)
    mine = chosen.reshape(batches, layout.world_size, micro)[:, rank]
    return [windows.read(ids) for ids in mine]
