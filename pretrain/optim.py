"""The optimizer (AdamW that skips non-finite steps), its parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
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


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips its update, on every rank alike, when any rank saw a non-finite loss or gradient.

    DeepSpeed checks gradients itself only in some modes (fp16; bf16, and fp32 under ZeRO 1-2); this covers
    the others (ZeRO-3, fp32 at stage 0) and the loss, whose gradient can be finite when the loss is not.
    DeepSpeed calls `step` on every rank (under ZeRO with the rank's partition of the fp32 weights), so one
    all-reduce agrees the decision. The training loop calls `begin_step` and `observe_loss` around each step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False
        self._loss_not_finite: torch.Tensor | None = None

    def begin_step(self) -> None:
        self.skipped = False
        self._loss_not_finite = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        # Kept as a tensor: checking it here would stall the device once per micro-batch.
        not_finite = ~torch.isfinite(loss.detach())
        self._loss_not_finite = not_finite if self._loss_not_finite is None else self._loss_not_finite | not_finite

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            bad += ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if self._loss_not_finite is not None:
            bad += self._loss_not_finite.to(device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skipped = bool(bad.item())
        return None if self.skipped else super().step(closure)
