"""When training goes wrong: steps with a non-finite loss or gradient, loss spikes, and preemption signals.

A non-finite step is skipped (by SkippingAdamW or DeepSpeed) and counted; too many in a row stop the run
without saving, so the newest checkpoint is still a good one. Loss spikes are counted, for a run's stability to
be compared across settings. SIGTERM or SIGUSR1 (SLURM's preemption
warnings) make every rank save a checkpoint at the end of the current step and exit with REQUEUE_EXIT_CODE, or,
before the first step, exit with that code at once.
"""

from __future__ import annotations

import math
import signal
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from data_pipeline.common.errors import REQUEUE_EXIT_CODE, UserError
from pretrain.checkpoint_store import newest_complete
from pretrain.config import Config

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(UserError):
    """The run stopped before max_steps; rank 0 prints the message and every rank exits with exit_code."""

    label = "stopped"
    every_rank_speaks = False


class TooManyNonFiniteSteps(TrainingStopped):
    pass


class Preempted(TrainingStopped):
    exit_code = REQUEUE_EXIT_CODE


class StoppedBeforeTraining(TrainingStopped):
    exit_code = REQUEUE_EXIT_CODE


class PreemptionWatch:
    """Records a preemption signal instead of dying of it. Once training has started, each rank votes after every
    step (its vote rides on the step's loss all-reduce); any vote stops every rank, which save a checkpoint and
    exit to be requeued. Before that (verifying data, converting a checkpoint: hours, at scale, with nothing new to
    save) the first signal stops the rank at once, with the same exit code."""

    def __init__(self):
        self.received: str | None = None
        self.training = False
        for preemption_signal in PREEMPTION_SIGNALS:
            signal.signal(preemption_signal, self._record)

    def _record(self, signal_number: int, _frame) -> None:
        first = self.received is None
        self.received = signal.Signals(signal_number).name
        if first and not self.training:
            raise self._stopped_before_training()

    def _stopped_before_training(self) -> StoppedBeforeTraining:
        return StoppedBeforeTraining(f"{self.received} asked to stop before the first step: nothing new to save;"
                                     " train.resume=auto starts again from where the run was (launchers requeue"
                                     " on this exit code)")

    def start_training(self) -> None:
        """From here a signal is acted on at the end of the step it arrives in. A signal already received (whose
        exception start-up code may have swallowed) stops the rank now."""
        if self.received is not None:
            raise self._stopped_before_training()
        self.training = True

    def vote(self) -> float:
        return float(self.received is not None)

    def agreed(self, mean_vote: float) -> str | None:
        """What asked the ranks to stop, given the mean of their votes; None to carry on."""
        if mean_vote <= 0:
            return None
        return self.received or "a signal to another rank"


class NonFiniteGuard:
    """Counts the steps skipped for a non-finite loss or gradient, says when to alert (once per streak), and
    stops the run after `limit` in a row. It also runs the NaN drill: rank 0's loss is made NaN at `drill_steps`.

    `total` survives a resume through the checkpoint's loop state; the streak starts again at zero."""

    LOOP_STATE_KEY = "non_finite_steps_skipped"

    def __init__(self, limit: int, run_dir: Path, precision: str, drill_steps: Iterable[int] = (),
                 is_main: bool = True):
        self.limit = limit
        self.run_dir = run_dir
        self.precision = precision
        self.drill_steps = frozenset(drill_steps)
        self.is_main = is_main
        self.total = 0
        self.in_a_row = 0

    @classmethod
    def from_config(cls, config: Config, precision: str, is_main: bool) -> NonFiniteGuard:
        faults = config.faults
        return cls(faults.max_consecutive_skipped_steps, config.run_dir, precision, faults.nan_loss_at_steps, is_main)

    def loop_state(self, step: int) -> dict[str, int]:
        return {self.LOOP_STATE_KEY: self.total}

    def restore(self, loop_state: dict) -> None:
        # Absent from checkpoints made before the count was kept (DeepSpeed's own "skipped_steps" is another count).
        self.total = loop_state.get(self.LOOP_STATE_KEY, 0)

    def poisons(self, step: int) -> bool:
        """Whether this rank's loss at `step` (1-based) is to be made NaN, as the drill asks."""
        return step in self.drill_steps and self.is_main

    def record(self, step: int, loss: float, optimizer_skipped: bool, step_applied: bool) -> str | None:
        """Count step `step` (1-based); return an alert's text on the first step of a streak, else None."""
        skipped = optimizer_skipped or not step_applied
        # Under fp16, DeepSpeed's loss scaler also skips steps whose scaled gradients overflowed while it finds
        # its scale; those are routine, not a sign of divergence.
        loss_scaler_skip = self.precision == "fp16" and not optimizer_skipped and math.isfinite(loss)
        not_finite = skipped and not loss_scaler_skip
        self.total += not_finite
        self.in_a_row = self.in_a_row + 1 if not_finite else 0
        if self.in_a_row != 1:  # a longer streak was alerted at its start, and stop_if_too_many ends it
            return None
        return (f"step {step}: loss {loss} (or its gradient) is not finite; the step was skipped ({self.total} skipped"
                " so far)")

    def metrics(self) -> dict[str, int]:
        return {"train/skipped_steps": self.total}

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


class LossSpikes:
    """Counts the steps whose loss is above `factor` times the lowest loss of the `window` steps before it: the
    measure of a run's stability. The count and the window survive a resume through the checkpoint's loop state."""

    LOOP_STATE_KEY = "loss_spikes"

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)
        self.total = 0

    @classmethod
    def from_config(cls, config: Config) -> LossSpikes:
        return cls(config.faults.spike_factor, config.faults.spike_window)

    def record(self, loss: float) -> None:
        if not math.isfinite(loss):  # counted by the non-finite guard
            return
        self.total += bool(self.recent) and loss > self.factor * min(self.recent)
        self.recent.append(loss)

    def metrics(self) -> dict[str, int]:
        return {"train/loss_spikes": self.total}

    def loop_state(self, step: int) -> dict:
        return {self.LOOP_STATE_KEY: {"total": self.total, "recent": list(self.recent)}}

    def restore(self, loop_state: dict) -> None:
        # Absent from checkpoints made before spikes were counted: the count starts there.
        saved = loop_state.get(self.LOOP_STATE_KEY, {"total": 0, "recent": []})
        self.total = saved["total"]
        self.recent.extend(saved["recent"])
