"""How fast a run goes: each step's throughput, model FLOPs utilisation and time spent waiting for data, and
every `logging.print_every` steps (and at the last) a progress line, with the time left at the recent pace, and the
process's memory under `system/`."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain.environment import system_metrics

RECENT_STEPS = 50


@dataclass
class Progress:
    tokens_per_step: int  # all ranks together
    flops_per_token: int  # the model's own count, forward and backward
    peak_flops: float | None  # of one device; None where unknown, which leaves MFU out
    world_size: int
    print_every: int
    last_step: int
    device: torch.device
    read_system_metrics: Callable[[torch.device], dict[str, float]] = system_metrics
    # The recent steps' seconds: their median paces the time left, unmoved by a step that validated or saved.
    recent_step_seconds: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))

    def step_metrics(self, step_seconds: float, data_wait_seconds: float) -> dict[str, float | None]:
        self.recent_step_seconds.append(step_seconds)
        tokens_per_second = self.tokens_per_step / step_seconds
        return {
            "perf/tokens_per_second": tokens_per_second,
            "perf/mfu": (self.flops_per_token * tokens_per_second / (self.peak_flops * self.world_size)
                         if self.peak_flops else None),
            "perf/step_seconds": step_seconds,
            "perf/data_wait_fraction": data_wait_seconds / step_seconds,
        }

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) reports: a progress line and system metrics."""
        return step % self.print_every == 0 or step == self.last_step

    def system_metrics(self) -> dict[str, float]:
        return self.read_system_metrics(self.device)

    def seconds_left(self, step: int) -> float:
        """The time the steps after `step` will take at the median pace of the recent ones (0 before any)."""
        if not self.recent_step_seconds:
            return 0.0
        return (self.last_step - step) * statistics.median(self.recent_step_seconds)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        """The progress line of a step, from the metrics logged for it."""
        return (
            f"step {step}/{self.last_step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e}"
            f" | {metrics['perf/tokens_per_second']:,.0f} tokens/s"
            f" | data wait {metrics['perf/data_wait_fraction']:.1%}"
            + (f" | val loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else "")
            + (f" | {duration(self.seconds_left(step))} left" if step < self.last_step else "")
        )


def duration(seconds: float) -> str:
    """`1h05m`, `4m10s` or `12s`."""
    whole = round(seconds)
    hours, minutes, rest = whole // 3600, whole // 60 % 60, whole % 60
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
