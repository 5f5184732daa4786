"""Checkpoints of a run: DeepSpeed's per-rank engine state plus the loop's own state, in
`<run_dir>/checkpoints/step_<N>/`.

A checkpoint counts only once every rank has finished writing it and its files are on the disk: rank 0 then
writes a `complete` marker listing each file's size, and `resume=auto` picks the newest checkpoint whose marker
and files agree. A crash mid-save, or a file damaged since, leaves the previous one in use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.common.errors import ConfigError, UserError
from data_pipeline.common.files import fsync_directory, fsync_tree, publish_directory, write_atomically
from pretrain.config import Config
from pretrain.run_data import DataOrder

COMPLETE_MARKER = "complete"
UNIVERSAL = "universal"  # DeepSpeed's universal form of a checkpoint, converted inside it


class CheckpointError(UserError):
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


def intact_checkpoints(run_dir: Path, warn: Callable[[str], None] | None = None) -> Iterator[Path]:
    """The complete checkpoints whose marker and files agree, newest first. A damaged one is passed over, and
    `warn` (if given) is told which and why."""
    for tag in reversed(complete_tags(run_dir)):
        checkpoint = checkpoints_dir(run_dir) / tag
        problem = damage(checkpoint)
        if problem is None:
            yield checkpoint
        elif warn is not None:
            warn(f"{checkpoint}: {problem}; passed over for the checkpoint before it")


def newest_complete(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact complete checkpoint (what `resume=auto` tries first), or None."""
    return next(intact_checkpoints(run_dir, warn), None)


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """What rank 0 recorded on completing a checkpoint: step, world_size, zero_stage, the size of each file, and
    preempted_by if a signal asked."""
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint that has its marker, or None if it is intact: a marker that is not a whole
    record (cut by a crash or a full disk), or a file it lists that is missing or not of the size it was written
    with. A marker from before the sizes were recorded is taken as it is."""
    try:
        marker = read_marker(checkpoint)
    except (OSError, ValueError):
        return f"its {COMPLETE_MARKER!r} marker is empty or cut short"
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return f"its {COMPLETE_MARKER!r} marker is not a checkpoint record"
    for name, size in marker.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if (actual := path.stat().st_size) != size:
            return f"{name} has {actual:,} bytes, not the {size:,} it was written with"
    return None


def file_sizes(checkpoint: Path) -> dict[str, int]:
    return {str(path.relative_to(checkpoint)): path.stat().st_size
            for path in sorted(checkpoint.rglob("*")) if path.is_file()}


def unreadable(checkpoint: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """What this rank's share of a checkpoint's files (every world_size-th) fails of a full read, or None.
    torch.save writes zip archives with a CRC-32 per entry, so reading every entry back finds damage that keeps
    a file's size (a flipped byte), which the marker cannot see and DeepSpeed would meet as a traceback."""
    listed = read_marker(checkpoint).get("files") or file_sizes(checkpoint)
    archives = sorted(name for name in listed if name.endswith(".pt") and not name.startswith(f"{UNIVERSAL}/"))
    for name in archives[rank::world_size]:
        try:
            with zipfile.ZipFile(checkpoint / name) as archive:
                bad_entry = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            return f"{name} cannot be read ({error})"
        if bad_entry is not None:
            return f"{name} is damaged (entry {bad_entry} fails its CRC check)"
    return None


def starting_candidates(config: Config, warn: Callable[[str], None] | None = None) -> Iterator[Path]:
    """What a run may start from, in order of preference: its own intact complete checkpoints, newest first
    (resume=auto; `warn` hears of damaged ones passed over), then train.branch_from (another run's checkpoint,
    which must be complete)."""
    if config.train.resume == "auto":
        yield from intact_checkpoints(config.run_dir, warn)
    if config.train.branch_from is None:
        return
    branch_point = Path(config.train.branch_from)
    if not (branch_point / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"train.branch_from: {branch_point} is not a complete checkpoint (no {COMPLETE_MARKER!r} marker); train"
            " the run it belongs to past that step first, or point it at one of that run's complete checkpoints"
        )
    yield branch_point


def starting_checkpoint(config: Config, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint a run tries first (see starting_candidates), or None to start from scratch."""
    return next(starting_candidates(config, warn), None)


def refuse_to_train_over_checkpoints(config: Config) -> None:
    """With train.resume=never, a run directory that already holds checkpoints is refused, not overwritten."""
    if config.train.resume == "never" and complete_tags(config.run_dir):
        raise ConfigError(
            f"train.resume: is 'never' but {config.run_dir} already holds checkpoints; set train.resume=auto to"
            " continue that run, or choose a new name"
        )


def save(
    engine, run_dir: Path, step: int, loop_state: dict[str, Any], keep: int, preempted_by: str | None = None,
    spare: list[int] = (),
) -> Path:
    """Write a checkpoint on every rank, make it durable, mark it complete (listing each file's size), then
    (keep > 0) delete all but the newest `keep` and those of the steps in `spare` (where decay branches start)."""
    tag = tag_for_step(step)
    path = checkpoints_dir(run_dir) / tag
    if dist.get_rank() == 0 and path.exists():
        # What an interrupted save of this step left (a resume went back past it): stale rank files would be
        # merged with the new ones.
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(checkpoints_dir(run_dir)), tag=tag, client_state=loop_state, save_latest=False)
    fsync_tree(path)  # each rank, for the files it wrote: on the disk before the marker says they are
    dist.barrier()
    if dist.get_rank() == 0:
        fsync_directory(checkpoints_dir(run_dir))  # the new step_N entry itself, or a crash can lose the folder
        marker = {"step": step, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                  "files": file_sizes(path),
                  # What the data position means, readable before any rank starts (see resume_position).
                  "data_order": loop_state["data_order"], "tokens_seen": loop_state["tokens_seen"]}
        if preempted_by:
            marker["preempted_by"] = preempted_by
        write_atomically(path / COMPLETE_MARKER, json.dumps(marker) + "\n")
        prune(run_dir, keep, spare, just_written=tag)  # only now that the new checkpoint is durable
    dist.barrier()
    return path


def prune(run_dir: Path, keep: int, spare: list[int] = (), just_written: str | None = None) -> None:
    """Keep the newest `keep` intact checkpoints (keep=0: all) and those of the steps in `spare`; delete the older
    ones, whole or not. Only intact ones count, so a damaged newest one never pushes out the one a resume would
    use. With `just_written` (the tag a save just completed) only checkpoints up to it count: newer ones are left
    from before a resume went back past them, and the one just written is never deleted."""
    intact = sorted(path.name for path in intact_checkpoints(run_dir))
    if just_written is not None:
        intact = [tag for tag in intact if tag <= just_written]
    if keep and len(intact) > keep:
        remove_older_than(run_dir, intact[-keep], spare={tag_for_step(step) for step in spare})


def remove_older_than(run_dir: Path, oldest_kept: str, spare: set[str] = frozenset()) -> None:
    """Delete every checkpoint, complete or not, older than `oldest_kept` (a complete one), but those in `spare`."""
    for directory in checkpoints_dir(run_dir).glob("step_*"):
        if directory.is_dir() and directory.name < oldest_kept and directory.name not in spare:
            shutil.rmtree(directory)


def has_partitioned_optimizer(checkpoint: Path) -> bool:
    """Whether each rank wrote its own slice of the optimizer state (ZeRO 1-3, and bf16 at stage 0)."""
    return any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt"))


def resume_plan(checkpoint: Path, world_size: int, zero_stage: int) -> bool:
    """Whether resuming `checkpoint` on `world_size` ranks needs DeepSpeed's universal form (partitioned
    optimizer state, written by another number of ranks). Raises CheckpointError for what cannot resume."""
    marker = read_marker(checkpoint)
    written_stage = marker.get("zero_stage", zero_stage)
    if written_stage != zero_stage:
        raise CheckpointError(
            f"{checkpoint}: was written with ZeRO-{written_stage} and this run uses ZeRO-{zero_stage}; resume it"
            f" with deepspeed.zero_stage={written_stage}, or start a new run (a new name)"
        )
    return marker["world_size"] != world_size and has_partitioned_optimizer(checkpoint)


def resume_position(checkpoint: Path, config: Config) -> tuple[int, int]:
    """(step, sequence): the step a run resumes at and the position in the data order its next step starts from.
    Raises CheckpointError if the data order changed since the checkpoint, unless train.data_order_change says to
    continue after the same number of tokens seen."""
    marker = read_marker(checkpoint)
    step, saved_order = marker["step"], marker.get("data_order")
    if saved_order is None:  # written before checkpoints recorded it: taken as unchanged
        return step, step * (config.train.global_batch_tokens // config.model.seq_len)
    changes = DataOrder.of(config).changes_since(saved_order)
    if changes and config.train.data_order_change == "refuse":
        raise CheckpointError(
            f"{checkpoint}: its data position means another order of the data ({'; '.join(changes)}), so resuming"
            " would skip or repeat data; restore the setting, or set train.data_order_change=continue_by_tokens to"
            f" go on after the {marker['tokens_seen']:,} tokens it has seen, in the new order"
        )
    return step, marker["tokens_seen"] // config.model.seq_len



def convert_to_universal(checkpoint: Path) -> Path:
    """Write (once) DeepSpeed's universal form of a checkpoint inside it: every parameter's fp32 weights and
    Adam moments whole, which any number of ranks can load and partition their own way."""
    universal = checkpoint / UNIVERSAL
    if (universal / COMPLETE_MARKER).exists():
        return universal
    # deferred: DeepSpeed takes seconds to import, and only a resume at another world size converts
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = checkpoint / f"{UNIVERSAL}.partial"  # renamed once whole, so a crash leaves no half conversion
    shutil.rmtree(partial, ignore_errors=True)
    workers = max(1, min(8, os.cpu_count() or 1))
    ds_to_universal(argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(partial),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the metadata Megatron models carry and a plain torch model lacks
    ))
    write_atomically(partial / COMPLETE_MARKER, json.dumps(read_marker(checkpoint)) + "\n")
    return publish_directory(partial, universal)


def load(engine, checkpoint: Path, universal: bool) -> dict[str, Any]:
    """Restore the engine (model, optimizer, scheduler) and return the loop state saved with it. With
    `universal`, from the checkpoint's universal form (the engine must be built with load_universal)."""
    if universal:
        _, loop_state = engine.load_checkpoint(str(checkpoint), tag=UNIVERSAL)
        if engine.zero_optimization_stage() == 3:
            _repair_zero3_universal_load(engine, checkpoint / UNIVERSAL)
    else:
        _, loop_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if loop_state is None:
        raise CheckpointError(f"{checkpoint}: DeepSpeed could not load it; move it aside to resume from the one before")
    return loop_state


def _repair_zero3_universal_load(engine, universal: Path) -> None:
    # DeepSpeed 0.19's ZeRO-3 universal loader gives every parameter group the first group's settings (so
    # weight decay lands on norms and biases) and one shared Adam step counter to all groups (advanced once per
    # group per step, which breaks the bias correction). Put back the saved settings and one counter per group.
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    for group, saved_group in zip(engine.optimizer.param_groups, saved["param_groups"]):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = engine.optimizer.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights, on the CPU, from a checkpoint of any ZeRO stage and number of ranks."""
    if has_partitioned_optimizer(checkpoint):
        # deferred: DeepSpeed takes seconds to import, and a command reading a checkpoint may not need it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights, gathered from every rank's partition.
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    # ZeRO-0 in fp32: the weights are whole in the model file.
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in module.items()}
