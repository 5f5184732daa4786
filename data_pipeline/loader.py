"""Deterministic batches of fixed-length token windows, split equally across ranks.

The token stream is cut into windows of seq_len + 1 tokens (inputs and next-token targets) that start every
seq_len tokens. The order of windows depends only on (seed, epoch), never on the world size: each optimizer
step takes the next `sequences_per_step` windows of that order, and rank r takes the r-th equal slice of
them. So every rank does the same number of steps by construction, and the position in the data is the step
number alone, which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.errors import DataError
from pretrain.config import BatchLayout


class TokenWindows:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 tensor of the windows at those indices."""
        starts = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
        return torch.from_numpy(self.tokens[starts + np.arange(self.seq_len + 1)].astype(np.int64))


class TrainBatches:
    """The training micro-batches of one rank, addressed by global step."""

    def __init__(self, windows: TokenWindows, layout: BatchLayout, rank: int, seed: int):
        self.windows = windows
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = windows.count // layout.sequences_per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training data has {windows.count} windows of {windows.seq_len + 1} tokens, fewer than one"
                f" global batch of {layout.sequences_per_step}; lower train.global_batch_tokens or add data"
            )
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.windows.count)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's `accumulation_steps` micro-batches for optimizer step `step` (0-based)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        per_rank = self.layout.sequences_per_rank
        start = step_in_epoch * self.layout.sequences_per_step + self.rank * per_rank
        rank_windows = self.windows.gather(self._order(epoch)[start : start + per_rank])
        return list(rank_windows.split(self.layout.micro_batch_size))


def validation_batches(windows: TokenWindows, layout: BatchLayout, rank: int, batches: int) -> list[torch.Tensor]:
    """A fixed set of validation micro-batches for this rank.

    The windows are spread evenly over the whole split, so the loss represents every source in it rather
    than whichever comes first in the file.
    """
    micro = layout.micro_batch_size
    per_batch = micro * layout.world_size
    batches = min(batches, windows.count // per_batch)
    if batches == 0:
        raise DataError(
            f"the validation data has {windows.count} windows, fewer than one micro-batch per rank"
            f" ({per_batch}); raise data.val_fraction or lower train.micro_batch_size"
        )
    chosen = np.linspace(0, windows.count - 1, batches * per_batch).round().astype(np.int64)
    mine = chosen.reshape(batches, layout.world_size, micro)[:, rank]
    return [windows.gather(indices) for indices in mine]
