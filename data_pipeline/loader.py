"""Deterministic, resumable batches of token windows from a prepared dataset's shards, in the global order of
`data_pipeline.order`, read through `data_pipeline.shard_reader`.

Optimizer step s takes positions [s*S, (s+1)*S) of that order (S sequences per step); rank r takes the r-th
equal slice. So every rank does the same number of steps by construction, no window is repeated or skipped
within an epoch, and the step number alone is the loader's state: a run resumed at any world size with the
same global batch continues exactly. (A run that continues after changing S goes on from the sequence its
checkpoint reached.) DataLoader workers each take whole steps (worker k of n takes every n-th), so adding
workers changes nothing but speed.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.common.errors import DataError
from data_pipeline.config import OPEN_SHARDS, BatchLayout
from data_pipeline.order import GlobalOrder
from data_pipeline.shard_reader import Windows


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
