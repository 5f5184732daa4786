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

import torch
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


def newest_complete(run_dir: Path) -> Path | None:
    """The checkpoint `resume=auto` would pick, if any."""
    tags = complete_tags(run_dir)
    return checkpoints_dir(run_dir) / tags[-1] if tags else None


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """What rank 0 recorded on completing a checkpoint: step, world_size, and preempted_by if a signal asked."""
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


def refuse_to_train_over_checkpoints(config: Config) -> None:
    """With train.resume=never, a run directory that already holds checkpoints is refused, not overwritten."""
    if config.train.resume == "never" and complete_tags(config.run_dir):
        raise ConfigError(
            f"train.resume: is 'never' but {config.run_dir} already holds checkpoints; set train.resume=auto to"
            " continue that run, or choose a new name"
        )


def save(
    engine, run_dir: Path, step: int, loop_state: dict[str, Any], keep: int, preempted_by: str | None = None
) -> Path:
    """Write a checkpoint on every rank, mark it complete, then (keep > 0) delete all but the newest `keep`."""
    tag = tag_for_step(step)
    engine.save_checkpoint(str(checkpoints_dir(run_dir)), tag=tag, client_state=loop_state, save_latest=False)
    dist.barrier()  # every rank has written its shard
    path = checkpoints_dir(run_dir) / tag
    if dist.get_rank() == 0:
        marker = {"step": step, "world_size": dist.get_world_size()}
        if preempted_by:
            marker["preempted_by"] = preempted_by
        (path / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
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
    written_by = read_marker(path)["world_size"]
    if written_by != dist.get_world_size():
        raise CheckpointError(
            f"{path}: was written by {written_by} ranks and this run has {dist.get_world_size()}; resume it with"
            f" {written_by} ranks, or start a new run (a new name)"
        )
    _, loop_state = engine.load_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    if loop_state is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load it; move it aside to resume from the one before")
    return loop_state


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights, on the CPU, from a checkpoint of any ZeRO stage and number of ranks."""
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        # The fp32 master weights, gathered from every rank's partition.
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    # ZeRO-0 in fp32: the weights are whole in the model file.
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in module.items()}
