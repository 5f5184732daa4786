"""The run's checkpointing component: when it saves (every `train.checkpoint_every` steps, at the steps of
`train.checkpoint_steps`, at the last step, at the step a preemption signal stopped), how many it keeps, and what
a run resumes from. It owns one registry of the state a checkpoint carries besides DeepSpeed's engine (the loop
counters, the data position, the fault counters); randomness needs no entry, being a function of
(seed, step, rank). What a checkpoint holds on disk, and its `complete` marker, are pretrain/checkpoint_store.py's.

Resuming picks the newest checkpoint every rank can read whole: each rank reads back its share of the files
(a flipped byte that kept a file's size included), the ranks agree, and a damaged one is named and passed over
for the one before it, before the data loader or the engine is built around its position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from data_pipeline.common.errors import DataError, UserError
from pretrain import checkpoint_store
from pretrain.checkpoint_store import CheckpointError
from pretrain.config import Config
from pretrain.faults import Preempted
from pretrain.run_data import DataOrder

T = TypeVar("T")


class Stateful(Protocol):
    """A part of the run whose state a checkpoint saves and a resume restores."""

    def loop_state(self, step: int) -> dict[str, Any]:
        """Its state after `step` steps, as JSON-able values under keys of its own."""

    def restore(self, loop_state: dict[str, Any]) -> None:
        """Take back the state a checkpoint saved (raising a UserError if the run cannot go on from it)."""


def _alone(work: Callable[[], T]) -> T:
    return work()


def _gather_alone(problem: str | None) -> list[str]:
    return [problem] if problem else []


@dataclass(frozen=True)
class Ranks:
    """What the checkpointer needs of the other ranks; the defaults are a world of one (in-process tests)."""

    rank: int = 0
    world_size: int = 1
    main_first: Callable[[Callable[[], Any]], Any] = _alone  # run on rank 0, then on the others
    gather_problems: Callable[[str | None], list[str]] = _gather_alone  # every rank's problem, None for none


@dataclass
class Resumption:
    """Where a run starts: a checkpoint (or none), the step and data sequence it resumes at, and whether it loads
    through DeepSpeed's universal form (written by another number of ranks)."""

    checkpoint: Path | None = None
    step: int = 0
    sequence: int = 0
    universal: bool = False

    @property
    def position(self) -> tuple[int, int]:
        return self.step, self.sequence


@dataclass
class DataPosition:
    """Where the run is in its data: the fingerprint of the data it trains on, the order's settings and the
    tokens seen, which a resume checks and continues from."""

    fingerprint: str
    order: DataOrder
    tokens_before: Callable[[int], int]  # tokens trained on before a step (the loader's count)

    def loop_state(self, step: int) -> dict[str, Any]:
        return {"data_fingerprint": self.fingerprint, "data_order": self.order.record(),
                "tokens_seen": self.tokens_before(step)}

    def restore(self, loop_state: dict[str, Any]) -> None:
        saved = loop_state["data_fingerprint"]
        if saved != self.fingerprint:
            raise DataError(f"was trained on other data (fingerprint {saved[:12]}, now {self.fingerprint[:12]});"
                            " restore data.dir or start a new run")


@dataclass
class Checkpointer:
    run_dir: Path
    every: int
    last_step: int
    extra_steps: tuple[int, ...] = ()  # where a WSD run's decay branches start; never pruned
    keep: int = 0  # intact checkpoints kept, newest first, besides the extra steps'; 0 keeps all
    ranks: Ranks = field(default_factory=Ranks)
    # checkpoint_store.save (every rank writes, rank 0 marks and prunes) and checkpoint_store.load; a test may pass
    # others.
    write: Callable[..., Path] = checkpoint_store.save
    read: Callable[..., dict[str, Any]] = checkpoint_store.load
    components: dict[str, Stateful] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, ranks: Ranks = Ranks()) -> Checkpointer:
        train = config.train
        return cls(config.run_dir, train.checkpoint_every, train.max_steps, tuple(train.checkpoint_steps),
                   train.keep_checkpoints, ranks)

    def register(self, **components: Stateful) -> None:
        self.components.update(components)

    def loop_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after `step` steps records besides the engine: the step and every component's state."""
        state: dict[str, Any] = {"step": step}
        for component in self.components.values():
            state.update(component.loop_state(step))
        return state

    def plan_resume(self, config: Config, warn: Callable[[str], None]) -> Resumption:
        """Choose what the run starts from: the newest candidate (checkpoint_store.starting_candidates) every rank reads
        whole, its position in the data and how it loads; the universal form is converted here (rank 0, once).
        Raises CheckpointError for a checkpoint this run cannot continue (another ZeRO stage, another order), and
        ConfigError for train.resume=never over a run that has checkpoints."""
        checkpoint_store.refuse_to_train_over_checkpoints(config)
        for candidate in checkpoint_store.starting_candidates(config, warn):
            problems = self.ranks.gather_problems(
                checkpoint_store.unreadable(candidate, self.ranks.rank, self.ranks.world_size))
            if problems:
                warn(f"{candidate}: {problems[0]}; passed over for the checkpoint before it")
                continue
            universal = checkpoint_store.resume_plan(candidate, self.ranks.world_size, config.deepspeed.zero_stage)
            if universal:
                self.ranks.main_first(functools.partial(checkpoint_store.convert_to_universal, candidate))
            step, sequence = checkpoint_store.resume_position(candidate, config)
            return Resumption(candidate, step, sequence, universal)
        return Resumption()

    def resume(self, engine, resumption: Resumption, say: Callable[[str], None] = print) -> None:
        """Load the engine from the planned checkpoint, give every registered component its saved state, and `say`
        where the run goes on from."""
        if resumption.checkpoint is None:
            return
        failure = None
        try:
            loop_state = self.read(engine, resumption.checkpoint, resumption.universal)
        except Exception as error:  # DeepSpeed's own, for what a full read of the files could not see
            failure = f"{type(error).__name__}: {error}"
        problems = self.ranks.gather_problems(failure)
        if problems:
            raise CheckpointError(f"{resumption.checkpoint}: DeepSpeed could not load it ({problems[0]}); rename it"
                                  " (to anything not starting with step_) to resume from the one before")
        try:
            for component in self.components.values():
                component.restore(loop_state)
        except UserError as error:
            raise type(error)(f"{resumption.checkpoint}: {error}") from None
        own = resumption.checkpoint.parent.parent == self.run_dir
        written_by = checkpoint_store.read_marker(resumption.checkpoint)["world_size"]
        say(f"{'resumed from ' + resumption.checkpoint.name if own else f'branched from {resumption.checkpoint}'}"
            f" (step {resumption.step})" + (
                f", written by {written_by} ranks, through its universal form" if resumption.universal else ""))

    def due(self, step: int, preempted: bool = False) -> bool:
        return step % self.every == 0 or step == self.last_step or step in self.extra_steps or preempted

    def save(self, engine, step: int, preempted_by: str | None = None) -> Path | None:
        """Save after step `step` (1-based) if it is due a checkpoint. After a preemption signal (`preempted_by`
        names it) the checkpoint is written and, short of the last step, Preempted raised to requeue the run."""
        if not self.due(step, preempted_by is not None):
            return None
        saved = self.write(engine, self.run_dir, step, self.loop_state(step), keep=self.keep,
                           preempted_by=preempted_by, spare=self.extra_steps)
        if preempted_by and step < self.last_step:
            raise Preempted(
                f"{preempted_by} asked to stop: saved {saved} at step {step}; resume with train.resume=auto"
                " (launchers requeue on this exit code)"
            )
        return saved
