"""When training goes wrong: steps with a non-finite loss or gradient, and preemption signals.

A non-finite step is skipped (by SkippingAdamW or DeepSpeed) and counted; too many in a row stop the run
without saving, so the newest checkpoint is still a good one. SIGTERM or SIGUSR1 (SLURM's preemption
warnings) make every rank save a checkpoint at the end of the current step and exit with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import signal
from pathlib import Path

from data_pipeline.errors import REQUEUE_EXIT_CODE, UserError
from pretrain.checkpoint import newest_complete

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(UserError):
    """The run stopped before max_steps; rank 0 prints the message and every rank exits with exit_code."""

    label = "stopped"
    every_rank_speaks = False


class TooManyNonFiniteSteps(TrainingStopped):
    pass


class Preempted(TrainingStopped):
    exit_code = REQUEUE_EXIT_CODE


class PreemptionWatch:
    """Records a preemption signal instead of dying of it; the loop checks `received` after each step."""

    def __init__(self):
        self.received: str | None = None
        for preemption_signal in PREEMPTION_SIGNALS:
            signal.signal(preemption_signal, self._record)

    def _record(self, signal_number: int, _frame) -> None:
        self.received = signal.Signals(signal_number).name


class NonFiniteSteps:
    """Counts skipped non-finite steps, and how many in a row; `limit` in a row stop the run."""

    def __init__(self, limit: int, run_dir: Path, total: int = 0):
        self.limit = limit
        self.run_dir = run_dir
        self.total = total  # a resumed run carries on the count of the run it continues
        self.in_a_row = 0

    def record(self, not_finite: bool) -> None:
        self.total += not_finite
        self.in_a_row = self.in_a_row + 1 if not_finite else 0

    def stop_if_too_many(self, step: int) -> None:
        if self.in_a_row < self.limit:
            return
        last_checkpoint = newest_complete(self.run_dir)
        resume_from = (
            f"The last checkpoint, {last_checkpoint}, is intact: lower train.lr or raise train.warmup_steps and"
            " rerun to resume from it"
            if last_checkpoint
            else "No checkpoint was written yet: lower train.lr or raise train.warmup_steps and start again"
        )
        raise TooManyNonFiniteSteps(
            f"steps {step - self.limit + 1}-{step}: {self.limit} steps in a row had a non-finite loss or"
            f" gradient (faults.max_consecutive_skipped_steps={self.limit}); stopped without saving. {resume_from}"
        )
