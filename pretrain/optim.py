"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn

from pretrain.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norm gains and biases only pulls them away from their job."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """The learning rate at `step` (0-based), as a fraction of the peak.

    Linear warmup to the peak, then either cosine decay to min_lr_ratio at max_steps, or warmup-stable-decay:
    the peak until the last decay_fraction of the steps, then a linear decay to min_lr_ratio. A WSD run's
    stable phase can be branched into decays of several lengths, one run serving several token budgets.
    """
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "wsd":
        decay_steps = max(1, round(train.decay_fraction * train.max_steps))
        progress = min(1.0, max(0, step - (train.max_steps - decay_steps)) / decay_steps)
        return 1 - (1 - train.min_lr_ratio) * progress
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine
