"""Checkpoints of a run: DeepSpeed's per-rank engine state plus the loop's own state, in
`<run_dir>/checkpoints/step_<N>/`.

A checkpoint counts only once every rank has finished writing it: rank 0 then writes a `complete` marker,
and `resume=auto` picks the newest checkpoint that has one. A crash mid-save leaves the previous one in use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain.config import Config, ConfigError

COMPLETE_MARKER = "complete"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(run_dir: Path) -> list[str]:
    """Tags of the checkpoints every rank finished writing, oldest first."""
    directory = checkpoints_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(p.parent.name for p in directory.glob(f"step_*/{COMPLETE_MARKER}"))


def refuse_to_train_over_checkpoints(config: Config) -> None:
    """With train.resume=never, a run directory that already holds checkpoints is refused, not overwritten."""
    if config.train.resume == "never" and complete_tags(config.run_dir):
        raise ConfigError(
            f"train.resume: is 'never' but {config.run_dir} already holds checkpoints; set train.resume=auto to"
            " continue that run, or choose a new name"
        )


def save(engine, run_dir: Path, step: int, loop_state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint on every rank, mark it complete, then (keep > 0) delete all but the newest `keep`."""
    tag = tag_for_step(step)
    engine.save_checkpoint(str(checkpoints_dir(run_dir)), tag=tag, client_state=loop_state, save_latest=False)
    dist.barrier()  # every rank has written its shard
    path = checkpoints_dir(run_dir) / tag
    if dist.get_rank() == 0:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}) + "\n")
        complete = complete_tags(run_dir)
        if keep and len(complete) > keep:
            remove_older_than(run_dir, complete[-keep])
    dist.barrier()
    return path


def remove_older_than(run_dir: Path, oldest_kept: str) -> None:
    """Delete every checkpoint, complete or not, older than `oldest_kept` (a complete one)."""
    for directory in checkpoints_dir(run_dir).glob("step_*"):
        if directory.is_dir() and directory.name < oldest_kept:
            shutil.rmtree(directory)


def load(engine, run_dir: Path, tag: str) -> dict[str, Any]:
    """Restore the engine (model, optimizer, scheduler) and return the loop state saved with it."""
    path = checkpoints_dir(run_dir) / tag
    written_by = json.loads((path / COMPLETE_MARKER).read_text())["world_size"]
    if written_by != dist.get_world_size():
        raise CheckpointError(
            f"{path}: was written by {written_by} ranks and this run has {dist.get_world_size()}; resume it with"
            f" {written_by} ranks, or start a new run (a new name)"
        )
    _, loop_state = engine.load_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    if loop_state is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load it; move it aside to resume from the one before")
    return loop_state
