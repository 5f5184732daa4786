"""When a run saves: every `train.checkpoint_every` steps, at the steps of `train.checkpoint_steps`, at the last
step, and at the step a preemption signal stopped; how many it keeps. What a checkpoint holds, and its
`complete` marker, are pretrain/checkpoint.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain import checkpoint
from pretrain.config import Config
from pretrain.faults import Preempted


@dataclass
class Checkpointer:
    run_dir: Path
    every: int
    last_step: int
    extra_steps: tuple[int, ...] = ()  # where a WSD run's decay branches start; never pruned
    keep: int = 0  # complete checkpoints kept, newest first, besides the extra steps'; 0 keeps all
    # checkpoint.save (every rank writes, rank 0 marks and prunes); a test passes a plain function.
    write: Callable[..., Path] = checkpoint.save

    @classmethod
    def from_config(cls, config: Config) -> Checkpointer:
        train = config.train
        return cls(config.run_dir, train.checkpoint_every, train.max_steps, tuple(train.checkpoint_steps),
                   train.keep_checkpoints)

    def due(self, step: int, preempted: bool = False) -> bool:
        return step % self.every == 0 or step == self.last_step or step in self.extra_steps or preempted

    def save(self, engine, step: int, loop_state: dict[str, Any], preempted_by: str | None = None) -> Path | None:
        """Save after step `step` (1-based) if it is due a checkpoint. After a preemption signal (`preempted_by`
        names it) the checkpoint is written and, short of the last step, Preempted raised to requeue the run."""
        if not self.due(step, preempted_by is not None):
            return None
        saved = self.write(engine, self.run_dir, step, loop_state, keep=self.keep, preempted_by=preempted_by,
                           spare=self.extra_steps)
        if preempted_by and step < self.last_step:
            raise Preempted(
                f"{preempted_by} asked to stop: saved {saved} at step {step}; resume with train.resume=auto"
                " (launchers requeue on this exit code)"
            )
        return saved
